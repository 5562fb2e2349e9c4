//! The dialplan interpreter: a step function over one call's channel (context,
//! extension, priority, variables). It runs the bookkeeping applications itself and
//! returns, one at a time, the [`Action`]s that need the call; the B2BUA reports what
//! came of them ([`Execution::dial_finished`]) and asks for the next.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::subst::{self, split_top, Lookup};
use crate::{App, Dialplan, DialplanError};

/// Who is calling.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallerId {
    pub num: String,
    pub name: String,
}

impl CallerId {
    /// `"Name" <num>`, `Name <num>` or `num`.
    pub fn parse(s: &str) -> CallerId {
        let s = s.trim();
        match (s.find('<'), s.rfind('>')) {
            (Some(a), Some(b)) if a < b => CallerId {
                num: s[a + 1..b].trim().to_string(),
                name: s[..a].trim().trim_matches('"').trim().to_string(),
            },
            _ => CallerId {
                num: s.to_string(),
                name: String::new(),
            },
        }
    }
}

impl CallerId {
    /// As Asterisk's CDR `clid` column writes it: `"Name" <num>`.
    pub fn clid(&self) -> String {
        format!("\"{}\" <{}>", self.name, self.num)
    }
}

/// Asterisk's `${DIALSTATUS}` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialStatus {
    Answer,
    Busy,
    NoAnswer,
    Cancel,
    Congestion,
    ChanUnavail,
    InvalidArgs,
}

impl DialStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DialStatus::Answer => "ANSWER",
            DialStatus::Busy => "BUSY",
            DialStatus::NoAnswer => "NOANSWER",
            DialStatus::Cancel => "CANCEL",
            DialStatus::Congestion => "CONGESTION",
            DialStatus::ChanUnavail => "CHANUNAVAIL",
            DialStatus::InvalidArgs => "INVALIDARGS",
        }
    }

    /// The status of a Dial whose targets all failed, from the best final response
    /// (`None`: no target could be tried at all).
    pub fn from_sip(status: Option<u16>) -> DialStatus {
        match status {
            None => DialStatus::ChanUnavail,
            Some(486 | 600) => DialStatus::Busy,
            Some(408 | 480 | 487) => DialStatus::NoAnswer,
            Some(500..=599) => DialStatus::Congestion,
            Some(_) => DialStatus::ChanUnavail,
        }
    }
}

/// Q.850 cause of a SIP final response (RFC 3398 §8.2.6.1), for `${HANGUPCAUSE}`.
pub fn sip_to_cause(status: u16) -> u16 {
    match status {
        401 | 402 | 403 | 407 | 603 => 21,
        404 | 485 | 604 => 1,
        408 | 504 => 102,
        410 => 22,
        480 => 18,
        483 | 482 => 25,
        484 => 28,
        486 | 600 => 17,
        487 => 16,
        502 => 38,
        503 => 34,
        405 | 406 | 415 | 501 => 79,
        606 => 58,
        400 | 481 | 500 => 41,
        _ => 127,
    }
}

/// The SIP status answering an unanswered call that ends with Q.850 `cause`
/// (RFC 3398 §7.2.4.1, with Asterisk's choices).
pub fn cause_to_sip(cause: u16) -> u16 {
    match cause {
        1..=3 => 404,
        16 | 18 | 19 | 20 | 31 => 480,
        17 => 486,
        21 => 603,
        22 => 410,
        27 | 38 => 502,
        28 => 484,
        29 | 79 => 501,
        34 | 41 | 42 | 44 | 47 | 58 => 503,
        65 | 88 => 488,
        102 => 504,
        _ => 500,
    }
}

/// How a call ended, as Asterisk's CDR `disposition` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Answered,
    NoAnswer,
    Busy,
    Congestion,
    Failed,
}

impl Disposition {
    pub const ALL: [Disposition; 5] = [
        Disposition::Answered,
        Disposition::NoAnswer,
        Disposition::Busy,
        Disposition::Congestion,
        Disposition::Failed,
    ];

    /// As Asterisk decides it: answered, else what the call's last Dial found
    /// (`DIALSTATUS`; whatever the dialplan did after it), else the call's Q.850 hangup
    /// cause: busy (17), congested (network/resource causes), not answered (ringing
    /// ran out, the caller gave up: 16, 18–20); anything else failed.
    pub fn of(cause: u16, answered: bool, dial_status: Option<&str>) -> Disposition {
        if answered {
            return Disposition::Answered;
        }
        match dial_status {
            Some("BUSY") => return Disposition::Busy,
            Some("NOANSWER") | Some("CANCEL") => return Disposition::NoAnswer,
            Some("CONGESTION") => return Disposition::Congestion,
            Some("CHANUNAVAIL") | Some("INVALIDARGS") => return Disposition::Failed,
            _ => {}
        }
        match cause {
            17 => Disposition::Busy,
            16 | 18..=20 => Disposition::NoAnswer,
            34 | 38 | 41 | 42 | 44 | 47 | 58 => Disposition::Congestion,
            _ => Disposition::Failed,
        }
    }

    /// Asterisk's spelling (`ANSWERED`, `NO ANSWER`, …).
    pub fn cdr_name(self) -> &'static str {
        match self {
            Disposition::Answered => "ANSWERED",
            Disposition::NoAnswer => "NO ANSWER",
            Disposition::Busy => "BUSY",
            Disposition::Congestion => "CONGESTION",
            Disposition::Failed => "FAILED",
        }
    }

    /// A metric label value (`no_answer`, …).
    pub fn label(self) -> &'static str {
        match self {
            Disposition::Answered => "answered",
            Disposition::NoAnswer => "no_answer",
            Disposition::Busy => "busy",
            Disposition::Congestion => "congestion",
            Disposition::Failed => "failed",
        }
    }
}

/// One target of a Dial: a user of this cluster, or a SIP URI elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialTarget {
    /// `SIP/bob`, `PJSIP/1001`: every current contact of the user.
    User(String),
    /// `SIP/1234@provider.example:5060`.
    Uri { user: String, host: String },
}

/// What `Dial(targets,timeout,options)` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DialRequest {
    pub targets: Vec<DialTarget>,
    /// No-answer timeout; `None` rings until the caller gives up.
    pub timeout: Option<Duration>,
    /// `r`: tell the caller it rings (180) ourselves, not only when a callee rings.
    pub ringing: bool,
    /// `f(x)` / `o(x)`: the caller id presented to the callees.
    pub caller_id: Option<CallerId>,
    /// `S(x)`: hang up x seconds after the answer.
    pub max_duration: Option<Duration>,
    /// `T` and `t`: the caller, the callee may transfer the other blind by keying
    /// [`BLIND_TRANSFER_KEYS`] and the number.
    pub transfer_by: [bool; 2],
}

/// The keys of a blind transfer during a call (Asterisk's `blindxfer` default).
pub const BLIND_TRANSFER_KEYS: &str = "#1";

/// Log levels of `Log()` and `Verbose()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warning,
    Notice,
    Verbose,
    Debug,
}

/// What the call has to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Answer,
    /// 180 Ringing to the caller.
    Ringing,
    /// 183 Session Progress (early media).
    Progress,
    Dial(DialRequest),
    /// Play these prompts (answering first unless `noanswer`).
    Playback {
        prompts: Vec<String>,
        noanswer: bool,
    },
    /// Send back the caller's media until it hangs up.
    Echo,
    /// Send the caller elsewhere: a 302 before the answer, a REFER after it; the
    /// outcome is reported with [`Execution::transfer_finished`].
    Transfer(DialTarget),
    Wait(Duration),
    /// 486 when unanswered; the call ends.
    Busy,
    /// 503 when unanswered; the call ends.
    Congestion,
    /// The call ends with this Q.850 cause ([`cause_to_sip`] when unanswered).
    Hangup {
        cause: u16,
    },
    Log {
        level: LogLevel,
        message: String,
    },
    /// Play prompts that a key press interrupts; the keys choose an extension
    /// ([`Execution::digit`]). Answers first unless `noanswer`; skipped when
    /// `skip_unanswered` and the call is not answered.
    Background {
        prompts: Vec<String>,
        noanswer: bool,
        skip_unanswered: bool,
    },
    /// Answer and play music on hold of `class` to the caller, for `duration` (or until
    /// the caller hangs up).
    MusicOnHold {
        class: String,
        duration: Option<Duration>,
    },
    /// Wait up to `timeout` for the caller to key an extension; with `music`, the
    /// caller hears that class meanwhile (until the first key).
    WaitExten {
        timeout: Duration,
        music: Option<String>,
    },
    /// Play prompts (none: silence) and read digits into a variable
    /// ([`Execution::digit`], [`Execution::prompts_done`], [`Execution::collect_timeout`]).
    Read {
        prompts: Vec<String>,
        noanswer: bool,
        skip_unanswered: bool,
    },
    /// Take a message for these mailboxes (`number` or `number@context`, the first
    /// one's greeting played); the outcome is reported with
    /// [`Execution::voicemail_finished`].
    VoiceMail {
        mailboxes: Vec<String>,
        greeting: VmGreeting,
        /// `s`: no "leave your message after the tone".
        skip_instructions: bool,
    },
    /// The mailbox owner's menu: log in (to `mailbox` when given, else the one keyed),
    /// with the PIN unless `skip_pin`.
    VoiceMailMain {
        mailbox: Option<String>,
        skip_pin: bool,
    },
}

/// The greeting VoiceMail plays before the tone (its options `u` and `b`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmGreeting {
    /// Neither option: "the person at extension N" alone.
    #[default]
    Plain,
    Unavailable,
    Busy,
}

/// `number[@context]` of VoiceMail and VoiceMailMain as a mailbox key (`default` left
/// out, as Asterisk's `1001` is `1001@default`).
pub fn mailbox_spec(spec: &str) -> Result<String, String> {
    let (number, context) = spec.split_once('@').unwrap_or((spec, ""));
    let plain = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
    };
    if number.is_empty() || !plain(number) || !plain(context) {
        return Err(format!("{spec:?} is not a mailbox (number[@context])"));
    }
    Ok(if context.is_empty() || context == "default" {
        number.to_string()
    } else {
        format!("{number}@{context}")
    })
}

/// Asterisk's defaults for `TIMEOUT(digit)` (between digits) and `TIMEOUT(response)`
/// (for the first digit after the prompts).
pub const DIGIT_TIMEOUT: Duration = Duration::from_secs(5);
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the call does after a key press or a collection timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collected {
    /// Wait up to this long for another digit, then [`Execution::collect_timeout`].
    More(Duration),
    /// The collection is over: the dialplan runs on ([`Execution::next_action`]).
    Done,
    /// Not collecting, or a key this collection does not take: nothing changes.
    Ignored,
}

/// Digits being collected.
#[derive(Debug, Clone)]
enum Collect {
    /// Background/WaitExten: keys choosing an extension of `context`. `single`:
    /// Background's `m`, only a key that is an extension of its own interrupts.
    Exten {
        context: String,
        digits: String,
        single: bool,
    },
    /// Read: keys into `var`, at most `max` (0: until #), waiting `timeout` for the
    /// first and `gap` between keys (both Read's timeout when given, as in Asterisk;
    /// else TIMEOUT(response) and TIMEOUT(digit)); `attempts` left (the prompts are
    /// played again after a silent one).
    Read {
        var: String,
        digits: String,
        max: usize,
        timeout: Duration,
        gap: Duration,
        attempts: u32,
        prompts: Vec<String>,
        noanswer: bool,
    },
}

/// Where a `Gosub` returns to, and the variables its arguments shadowed (restored
/// by `Return`, as Asterisk's LOCAL variables are).
#[derive(Debug, Clone)]
struct Frame {
    context: String,
    exten: String,
    priority: u32,
    saved: Vec<(String, Option<String>)>,
}

/// Nested `Gosub`s allowed: runaway recursion ends the call, not the node.
const MAX_GOSUB_DEPTH: usize = 100;

/// `[[context,]exten,]priority[(arg1[,...])]`: the target and the arguments.
pub(crate) fn split_gosub(args: &str) -> (String, Vec<String>) {
    let args = args.trim();
    match args.find('(') {
        Some(i) if args.ends_with(')') => (
            args[..i].to_string(),
            split_top(&args[i + 1..args.len() - 1], ',')
                .into_iter()
                .map(|a| a.trim().to_string())
                .collect(),
        ),
        _ => (args.to_string(), Vec::new()),
    }
}

/// `Name(arguments)` (an ExecIf branch): the application and its arguments.
pub(crate) fn split_app_call(s: &str) -> Result<(App, String), String> {
    let s = s.trim();
    let (name, args) = match s.find('(') {
        Some(i) if s.ends_with(')') => (&s[..i], &s[i + 1..s.len() - 1]),
        Some(_) => return Err(format!("{s:?}: '(' without ')'")),
        None => (s, ""),
    };
    let app = App::from_name(name.trim())
        .ok_or_else(|| format!("unknown application {:?}", name.trim()))?;
    Ok((app, args.to_string()))
}

/// `[[context,]exten,]priority`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GotoTarget {
    pub context: Option<String>,
    pub exten: Option<String>,
    pub priority: String,
}

pub(crate) fn parse_goto(s: &str) -> Result<GotoTarget, String> {
    let parts: Vec<String> = split_top(s, ',')
        .into_iter()
        .map(|p| p.trim().to_string())
        .collect();
    let t = match parts.as_slice() {
        [p] => GotoTarget {
            context: None,
            exten: None,
            priority: p.clone(),
        },
        [e, p] => GotoTarget {
            context: None,
            exten: Some(e.clone()),
            priority: p.clone(),
        },
        [c, e, p] => GotoTarget {
            context: Some(c.clone()),
            exten: Some(e.clone()),
            priority: p.clone(),
        },
        _ => return Err("expected [[context,]extension,]priority".into()),
    };
    if t.priority.is_empty() || t.exten.as_deref() == Some("") || t.context.as_deref() == Some("") {
        return Err(format!("incomplete target {s:?}"));
    }
    Ok(t)
}

/// A `Transfer` destination: `SIP/user`, `PJSIP/user@host`, `sip:user@host` or a bare
/// extension (a user of the domain).
pub(crate) fn parse_transfer_target(t: &str) -> Result<DialTarget, String> {
    let t = t.trim();
    if t.is_empty() {
        return Err("needs a destination".into());
    }
    if t.contains('/') {
        return parse_dial_target(t);
    }
    let rest = t
        .strip_prefix("sip:")
        .or_else(|| t.strip_prefix("SIP:"))
        .unwrap_or(t);
    parse_dial_target(&format!("SIP/{rest}"))
}

pub(crate) fn parse_dial_target(t: &str) -> Result<DialTarget, String> {
    let Some((tech, resource)) = t.split_once('/') else {
        return Err(format!("target {t:?} must be TECH/resource, e.g. SIP/bob"));
    };
    if !tech.eq_ignore_ascii_case("SIP") && !tech.eq_ignore_ascii_case("PJSIP") {
        return Err(format!(
            "technology {tech:?} is not supported: use SIP/ or PJSIP/"
        ));
    }
    let resource = resource.trim();
    if resource.is_empty() {
        return Err(format!("target {t:?} names nobody"));
    }
    Ok(match resource.split_once('@') {
        Some((user, host)) if !host.is_empty() => DialTarget::Uri {
            user: user.to_string(),
            host: host.to_string(),
        },
        Some(_) => return Err(format!("target {t:?} has an empty host")),
        None => DialTarget::User(resource.to_string()),
    })
}

/// Dial options: `r`, `f(x)`, `o(x)`, `S(x)`, `t`, `T`; `h H k K w W` are accepted and
/// have no effect here.
pub(crate) fn parse_dial_options(s: &str) -> Result<DialRequest, String> {
    let mut d = DialRequest::default();
    let chars: Vec<char> = s.trim().chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        let arg = if chars.get(i) == Some(&'(') {
            let close = chars[i..]
                .iter()
                .position(|&c| c == ')')
                .ok_or_else(|| format!("option {c}: '(' without ')'"))?;
            let a: String = chars[i + 1..i + close].iter().collect();
            i += close + 1;
            Some(a)
        } else {
            None
        };
        match c {
            'r' => d.ringing = true,
            'f' | 'o' => d.caller_id = arg.filter(|a| !a.is_empty()).map(|a| CallerId::parse(&a)),
            'S' => {
                let secs: f64 = arg
                    .as_deref()
                    .and_then(|a| a.trim().parse().ok())
                    .filter(|s: &f64| *s > 0.0)
                    .ok_or("option S needs a number of seconds, e.g. S(3600)")?;
                d.max_duration = Some(Duration::from_secs_f64(secs));
            }
            'T' => d.transfer_by[0] = true,
            't' => d.transfer_by[1] = true,
            'h' | 'H' | 'k' | 'K' | 'w' | 'W' => {}
            other => return Err(format!("unsupported Dial option {other:?}")),
        }
    }
    Ok(d)
}

fn seconds(s: &str) -> Option<Duration> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| *f > 0.0 && f.is_finite())
        .map(Duration::from_secs_f64)
}

/// `condition?when_true[:when_false]` (GotoIf, IF): the branch the condition picks.
fn choose(args: &str) -> Option<String> {
    let halves = split_top(args, '?');
    let cond = halves.first().map(|s| s.trim()).unwrap_or("");
    let branches = split_top(halves.get(1)?, ':');
    let pick = if crate::expr::truthy(cond) {
        branches.first()
    } else {
        branches.get(1)
    };
    pick.cloned()
}

/// The variables and functions a channel offers to substitution.
struct Channel<'a> {
    vars: &'a HashMap<String, String>,
    plan: &'a Dialplan,
    caller: &'a CallerId,
}

impl Lookup for Channel<'_> {
    fn var(&self, name: &str) -> Option<String> {
        self.vars
            .get(name)
            .or_else(|| self.plan.globals.get(name))
            .cloned()
    }

    fn func(&self, name: &str, args: &str) -> Option<Result<String, String>> {
        Some(match name {
            "CALLERID" => match args.trim().to_ascii_lowercase().as_str() {
                "num" | "number" => Ok(self.caller.num.clone()),
                "name" => Ok(self.caller.name.clone()),
                "all" => Ok(format!("\"{}\" <{}>", self.caller.name, self.caller.num)),
                other => Err(format!("unknown CALLERID field {other:?}")),
            },
            "TIMEOUT" => match timeout_var(args) {
                Some(key) => Ok(self
                    .vars
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| default_timeout(key).as_secs().to_string())),
                None => Err(format!(
                    "TIMEOUT({args}): only TIMEOUT(digit) and TIMEOUT(response) are supported"
                )),
            },
            "LEN" => Ok(args.chars().count().to_string()),
            "ISNULL" => Ok(if args.is_empty() { "1" } else { "0" }.into()),
            "IF" => {
                if split_top(args, '?').len() != 2 {
                    return Some(Err("expected IF(condition?true:false)".into()));
                }
                Ok(choose(args).unwrap_or_default())
            }
            _ => return None,
        })
    }
}

/// The variable keeping `TIMEOUT(which)`.
fn timeout_var(which: &str) -> Option<&'static str> {
    match which.trim().to_ascii_lowercase().as_str() {
        "digit" => Some("TIMEOUT(digit)"),
        "response" => Some("TIMEOUT(response)"),
        _ => None,
    }
}

fn default_timeout(key: &str) -> Duration {
    if key == "TIMEOUT(digit)" {
        DIGIT_TIMEOUT
    } else {
        RESPONSE_TIMEOUT
    }
}

/// Prompts of `Playback`/`Background`/`Read`: `a&b&c`, empty names dropped.
fn prompt_list(arg: &str) -> Vec<String> {
    arg.split('&')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The prompts saying each key of `digits` (`digits/5`, `digits/star`,
/// `digits/pound`); other characters are skipped.
pub fn digit_prompts(digits: &str) -> Vec<String> {
    digits
        .chars()
        .filter_map(|c| match c {
            '0'..='9' => Some(format!("digits/{c}")),
            '*' => Some("digits/star".into()),
            '#' => Some("digits/pound".into()),
            _ => None,
        })
        .collect()
}

/// The prompts saying `n` in English, with Asterisk's names: 1,234 is `digits/1
/// digits/thousand digits/2 digits/hundred digits/30 digits/4`. Beyond a trillion the
/// digits are said one by one.
pub fn number_prompts(n: i64) -> Vec<String> {
    let mut out = Vec::new();
    if n < 0 {
        out.push("digits/minus".to_string());
    }
    let n = n.unsigned_abs();
    if n == 0 {
        return vec!["digits/0".into()];
    }
    if n >= 1_000_000_000_000 {
        out.extend(digit_prompts(&n.to_string()));
        return out;
    }
    fn below_thousand(n: u64, out: &mut Vec<String>) {
        if n >= 100 {
            out.push(format!("digits/{}", n / 100));
            out.push("digits/hundred".into());
        }
        match n % 100 {
            0 => {}
            r @ 1..=19 => out.push(format!("digits/{r}")),
            r => {
                out.push(format!("digits/{}", r / 10 * 10));
                if r % 10 != 0 {
                    out.push(format!("digits/{}", r % 10));
                }
            }
        }
    }
    for (scale, name) in [
        (1_000_000_000, Some("digits/billion")),
        (1_000_000, Some("digits/million")),
        (1_000, Some("digits/thousand")),
        (1, None),
    ] {
        let part = n / scale % 1000;
        if part > 0 {
            below_thousand(part, &mut out);
            if let Some(name) = name {
                out.push(name.into());
            }
        }
    }
    out
}

/// Steps allowed without yielding an action: a `Goto` loop ends the call, not the node.
const MAX_SILENT_STEPS: u32 = 10_000;

/// One call running through the dialplan.
#[derive(Debug, Clone)]
pub struct Execution {
    plan: Arc<Dialplan>,
    context: String,
    exten: String,
    priority: u32,
    vars: HashMap<String, String>,
    caller: CallerId,
    finished: bool,
    queued: std::collections::VecDeque<Action>,
    collect: Option<Collect>,
    stack: Vec<Frame>,
    /// Unix ms and the default time zone for time conditions ([`Execution::set_clock`]).
    clock: Option<(i64, String)>,
    /// The `h` extension ran (or runs): never twice.
    in_hangup_handler: bool,
    /// Log actions returned one after the other (see [`Execution::next_action`]).
    logged_in_a_row: u32,
}

impl Execution {
    /// Starts a call dialling `exten` in `context`; fails when nothing matches (the
    /// caller gets 404).
    pub fn start(
        plan: Arc<Dialplan>,
        context: &str,
        exten: &str,
        caller: CallerId,
    ) -> Result<Execution, DialplanError> {
        if !plan.contexts.contains_key(context) {
            return Err(DialplanError::NoSuchContext(context.to_string()));
        }
        if plan.find(context, exten).is_none() {
            return Err(DialplanError::NoSuchExtension {
                context: context.to_string(),
                exten: exten.to_string(),
            });
        }
        let mut vars = HashMap::new();
        vars.insert("EXTEN".to_string(), exten.to_string());
        vars.insert("CONTEXT".to_string(), context.to_string());
        Ok(Execution {
            plan,
            context: context.to_string(),
            exten: exten.to_string(),
            priority: 1,
            vars,
            caller,
            finished: false,
            queued: Default::default(),
            collect: None,
            stack: Vec::new(),
            clock: None,
            in_hangup_handler: false,
            logged_in_a_row: 0,
        })
    }

    /// An execution with nothing left to run: for a call resumed on another node, where
    /// the dialplan's position was not replicated (the call was already bridged).
    pub fn finished(caller: CallerId) -> Execution {
        Execution {
            plan: Arc::new(Dialplan::default()),
            context: String::new(),
            exten: String::new(),
            priority: 1,
            vars: HashMap::new(),
            caller,
            finished: true,
            queued: Default::default(),
            collect: None,
            stack: Vec::new(),
            clock: None,
            in_hangup_handler: false,
            logged_in_a_row: 0,
        }
    }

    pub fn set_var(&mut self, name: &str, value: &str) {
        self.vars.insert(name.to_string(), value.to_string());
    }

    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    pub fn caller(&self) -> &CallerId {
        &self.caller
    }

    /// Reports how a Dial ended: sets `${DIALSTATUS}` and `${HANGUPCAUSE}`.
    /// The context the dialplan runs in now (after any Goto).
    pub fn context(&self) -> &str {
        &self.context
    }

    pub fn dial_finished(&mut self, status: DialStatus, final_sip_status: Option<u16>) {
        self.set_var("DIALSTATUS", status.as_str());
        let cause = match (status, final_sip_status) {
            (DialStatus::Answer, _) => 16,
            (DialStatus::NoAnswer, None) => 19,
            (_, Some(s)) => sip_to_cause(s),
            (DialStatus::Busy, None) => 17,
            (_, None) => 34,
        };
        self.set_var("HANGUPCAUSE", &cause.to_string());
    }

    /// The cause a call ends with when the dialplan runs out: what the last Dial said.
    fn fallthrough_cause(&self) -> u16 {
        match self.var("DIALSTATUS") {
            Some("BUSY") => 17,
            Some("CONGESTION") | Some("CHANUNAVAIL") => 34,
            Some("NOANSWER") => 19,
            _ => 16,
        }
    }

    fn end(&mut self, cause: u16) -> Action {
        self.finished = true;
        self.set_var("HANGUPCAUSE", &cause.to_string());
        Action::Hangup { cause }
    }

    fn jump(&mut self, target: &str) -> Result<(), String> {
        let t = parse_goto(target)?;
        if let Some(c) = t.context {
            if !self.plan.contexts.contains_key(&c) {
                return Err(format!("no context {c:?}"));
            }
            self.context = c;
        }
        if let Some(e) = t.exten {
            self.exten = e;
            self.vars.insert("EXTEN".into(), self.exten.clone());
            self.vars.insert("CONTEXT".into(), self.context.clone());
        }
        let (_, ext) = self
            .plan
            .find(&self.context, &self.exten)
            .ok_or_else(|| format!("no extension {:?} in [{}]", self.exten, self.context))?;
        self.priority = match t.priority.parse::<u32>() {
            Ok(n) => n,
            Err(_) => *ext
                .labels
                .get(&t.priority)
                .ok_or_else(|| format!("no label {:?}", t.priority))?,
        };
        Ok(())
    }

    /// Runs until the next action that needs the call.
    pub fn next_action(&mut self) -> Action {
        let a = self.step();
        // Log lines are returned one at a time, so a Log + Goto loop never runs out of
        // silent steps inside one call: count them across calls too.
        if !matches!(a, Action::Log { .. }) {
            self.logged_in_a_row = 0;
            return a;
        }
        self.logged_in_a_row += 1;
        if self.logged_in_a_row <= MAX_SILENT_STEPS {
            return a;
        }
        self.logged_in_a_row = 0;
        self.queued.clear();
        let end = self.end(34);
        self.queued.push_back(end);
        Action::Log {
            level: LogLevel::Error,
            message: format!(
                "{MAX_SILENT_STEPS} log lines without doing anything (a Goto loop?): hanging up"
            ),
        }
    }

    fn step(&mut self) -> Action {
        if let Some(a) = self.queued.pop_front() {
            return a;
        }
        // Whatever was being collected is over once the plan runs on.
        self.collect = None;
        if self.finished {
            let cause = self
                .var("HANGUPCAUSE")
                .and_then(|c| c.parse().ok())
                .unwrap_or(16);
            return Action::Hangup { cause };
        }
        for _ in 0..MAX_SILENT_STEPS {
            let plan = self.plan.clone();
            let Some((_, ext)) = plan.find(&self.context, &self.exten) else {
                let cause = self.fallthrough_cause();
                return self.end(cause);
            };
            let Some(p) = ext.priorities.get(&self.priority) else {
                let cause = self.fallthrough_cause();
                return self.end(cause);
            };
            self.vars
                .insert("PRIORITY".into(), self.priority.to_string());
            let mut warnings = Vec::new();
            let args = {
                let ch = Channel {
                    vars: &self.vars,
                    plan: &plan,
                    caller: &self.caller,
                };
                subst::substitute(&p.args, &ch, &mut warnings)
            };
            for w in warnings {
                self.queued.push_back(Action::Log {
                    level: LogLevel::Warning,
                    message: format!("line {}: {w}", p.line),
                });
            }
            self.priority += 1;
            let action = self.run_app(p.app, args, p.line);
            if let Some(a) = action {
                self.queued.push_back(a);
            }
            if let Some(a) = self.queued.pop_front() {
                return a;
            }
        }
        self.queued.push_back(Action::Log {
            level: LogLevel::Error,
            message: format!(
                "{MAX_SILENT_STEPS} steps without doing anything (a Goto loop?): hanging up"
            ),
        });
        let a = self.end(34);
        self.queued.push_back(a);
        self.queued
            .pop_front()
            .unwrap_or(Action::Hangup { cause: 34 })
    }

    /// Runs one application with its substituted arguments: bookkeeping here, the
    /// rest returned as the action the call must take.
    fn run_app(&mut self, app: App, args: String, line: usize) -> Option<Action> {
        let parts = split_top(&args, ',');
        let arg = |i: usize| parts.get(i).map(|s| s.trim()).unwrap_or("");
        match app {
            App::NoOp => None,
            App::Set => {
                match args.split_once('=') {
                    Some((name, value)) => self.assign(name.trim(), value),
                    None => self.queued.push_back(Action::Log {
                        level: LogLevel::Warning,
                        message: format!("line {}: Set({args}) needs name=value", line),
                    }),
                }
                None
            }
            App::Goto => {
                self.jump_or_end(&args, "Goto", &args, line);
                None
            }
            App::GotoIf => {
                if let Some(t) = choose(&args).filter(|t| !t.trim().is_empty()) {
                    self.jump_or_end(t.trim(), "GotoIf", &args, line);
                }
                None
            }
            App::Answer => Some(Action::Answer),
            App::Ringing => Some(Action::Ringing),
            App::Progress => Some(Action::Progress),
            App::Echo => Some(Action::Echo),
            App::Transfer => match parse_transfer_target(arg(0)) {
                Ok(t) => Some(Action::Transfer(t)),
                Err(e) => {
                    self.set_var("TRANSFERSTATUS", "FAILURE");
                    Some(Action::Log {
                        level: LogLevel::Warning,
                        message: format!("line {line}: Transfer({args}): {e}"),
                    })
                }
            },
            App::Wait => Some(Action::Wait(seconds(arg(0)).unwrap_or(Duration::ZERO))),
            App::Hangup => {
                let cause = arg(0).parse().unwrap_or(16);
                Some(self.end(cause))
            }
            App::Busy => {
                self.end(17);
                Some(Action::Busy)
            }
            App::Congestion => {
                self.end(34);
                Some(Action::Congestion)
            }
            App::Playback => Some(Action::Playback {
                prompts: prompt_list(arg(0)),
                noanswer: arg(1).contains("noanswer"),
            }),
            App::Background => {
                // Background(prompts[,options[,langoverride[,context]]])
                let context = match arg(3) {
                    "" => self.context.clone(),
                    c => c.to_string(),
                };
                if !self.plan.contexts.contains_key(&context) {
                    self.queued.push_back(Action::Log {
                        level: LogLevel::Warning,
                        message: format!(
                            "line {}: Background({args}): no context {context:?}",
                            line
                        ),
                    });
                    Some(self.end(16))
                } else {
                    self.collect = Some(Collect::Exten {
                        context,
                        digits: String::new(),
                        single: arg(1).contains('m'),
                    });
                    Some(Action::Background {
                        prompts: prompt_list(arg(0)),
                        noanswer: arg(1).contains('n'),
                        skip_unanswered: arg(1).contains('s'),
                    })
                }
            }
            App::WaitExten => {
                let timeout = seconds(arg(0)).unwrap_or_else(|| self.timeout("response"));
                self.collect = Some(Collect::Exten {
                    context: self.context.clone(),
                    digits: String::new(),
                    single: false,
                });
                // Options: m or m(class): music on hold while waiting.
                let music = match arg(1) {
                    "" => None,
                    "m" => Some(self.music_class()),
                    o => Some(
                        o.strip_prefix("m(")
                            .and_then(|c| c.strip_suffix(')'))
                            .filter(|c| !c.is_empty())
                            .map_or_else(|| self.music_class(), str::to_string),
                    ),
                };
                Some(Action::WaitExten { timeout, music })
            }
            App::Read => {
                // Read(var[,prompts[,maxdigits[,options[,attempts[,timeout]]]]])
                let prompts = prompt_list(arg(1));
                let noanswer = arg(3).contains('n');
                self.collect = Some(Collect::Read {
                    var: arg(0).to_string(),
                    digits: String::new(),
                    max: arg(2).parse().unwrap_or(0),
                    timeout: seconds(arg(5)).unwrap_or_else(|| self.timeout("response")),
                    gap: seconds(arg(5)).unwrap_or_else(|| self.timeout("digit")),
                    attempts: arg(4).parse::<u32>().unwrap_or(1).max(1),
                    prompts: prompts.clone(),
                    noanswer,
                });
                Some(Action::Read {
                    prompts,
                    noanswer,
                    skip_unanswered: arg(3).contains('s'),
                })
            }
            App::VoiceMail => {
                // VoiceMail(mailbox[@context][&mailbox[@context]...][,options])
                let mailboxes: Result<Vec<String>, String> =
                    arg(0).split('&').map(|m| mailbox_spec(m.trim())).collect();
                match mailboxes {
                    Ok(mailboxes) => Some(Action::VoiceMail {
                        mailboxes,
                        greeting: if arg(1).contains('b') {
                            VmGreeting::Busy
                        } else if arg(1).contains('u') {
                            VmGreeting::Unavailable
                        } else {
                            VmGreeting::Plain
                        },
                        skip_instructions: arg(1).contains('s'),
                    }),
                    Err(e) => {
                        self.set_var("VMSTATUS", "FAILED");
                        Some(Action::Log {
                            level: LogLevel::Warning,
                            message: format!("line {line}: VoiceMail({args}): {e}"),
                        })
                    }
                }
            }
            App::VoiceMailMain => {
                // VoiceMailMain([mailbox][@context][,options])
                let mailbox = match arg(0) {
                    "" => Ok(None),
                    m => mailbox_spec(m).map(Some),
                };
                match mailbox {
                    Ok(mailbox) => Some(Action::VoiceMailMain {
                        mailbox,
                        skip_pin: arg(1).contains('s'),
                    }),
                    Err(e) => Some(Action::Log {
                        level: LogLevel::Warning,
                        message: format!("line {line}: VoiceMailMain({args}): {e}"),
                    }),
                }
            }
            App::Log => {
                let level = match arg(0).to_ascii_uppercase().as_str() {
                    "ERROR" => LogLevel::Error,
                    "WARNING" => LogLevel::Warning,
                    "NOTICE" => LogLevel::Notice,
                    "DEBUG" => LogLevel::Debug,
                    _ => LogLevel::Verbose,
                };
                let message = parts.get(1..).map(|m| m.join(",")).unwrap_or_default();
                Some(Action::Log { level, message })
            }
            App::Verbose => {
                // Verbose([level,]message)
                let message = if parts.len() > 1 && arg(0).parse::<u32>().is_ok() {
                    parts[1..].join(",")
                } else {
                    args.clone()
                };
                Some(Action::Log {
                    level: LogLevel::Verbose,
                    message,
                })
            }
            App::Dial => Some(self.dial(&parts, line)),
            // Not answering: early media before an answer, as Asterisk plays on the
            // channel as it is.
            App::GotoIfTime => {
                // GotoIfTime(times,weekdays,mdays,months[,tz]?[true][:false])
                let halves = split_top(&args, '?');
                let spec = halves.first().map(String::as_str).unwrap_or("");
                let inside = match (crate::timing::TimeSpec::parse(spec), &self.clock) {
                    (Ok(t), Some((ms, tz))) => t.matches(*ms, tz),
                    (Ok(_), None) => Err("no clock given to the dialplan".into()),
                    (Err(e), _) => Err(e),
                };
                match inside {
                    Ok(inside) => {
                        let branches = halves.get(1).map(|b| split_top(b, ':')).unwrap_or_default();
                        let pick = if inside {
                            branches.first()
                        } else {
                            branches.get(1)
                        };
                        if let Some(t) = pick.filter(|t| !t.trim().is_empty()) {
                            self.jump_or_end(t.trim(), "GotoIfTime", &args, line);
                        }
                    }
                    Err(e) => self.queued.push_back(Action::Log {
                        level: LogLevel::Warning,
                        message: format!("line {line}: GotoIfTime({args}): {e}"),
                    }),
                }
                None
            }
            App::MusicOnHold => Some(Action::MusicOnHold {
                class: match arg(0) {
                    "" => self.music_class(),
                    c => c.to_string(),
                },
                duration: seconds(arg(1)),
            }),
            App::SayDigits => Some(Action::Playback {
                prompts: digit_prompts(arg(0)),
                noanswer: true,
            }),
            App::SayNumber => match arg(0).parse::<i64>() {
                Ok(n) => Some(Action::Playback {
                    prompts: number_prompts(n),
                    noanswer: true,
                }),
                Err(_) => Some(Action::Log {
                    level: LogLevel::Warning,
                    message: format!("line {line}: SayNumber({args}): not a whole number"),
                }),
            },
            App::Gosub => {
                self.gosub(&args, line);
                None
            }
            App::Return => {
                self.gosub_return(&args, line);
                None
            }
            // ExecIf(cond?App(args)[:App(args)])
            App::ExecIf => match choose(&args).filter(|b| !b.trim().is_empty()) {
                None => None,
                Some(branch) => match split_app_call(&branch) {
                    Ok((App::ExecIf, _)) | Err(_) => {
                        self.queued.push_back(Action::Log {
                            level: LogLevel::Warning,
                            message: format!("line {line}: ExecIf({args}): cannot run {branch:?}"),
                        });
                        None
                    }
                    Ok((app, inner)) => self.run_app(app, inner, line),
                },
            },
        }
    }

    /// Gosub: remembers where to return, jumps, sets ARG1..ARGn and ARGC.
    fn gosub(&mut self, args: &str, line: usize) {
        if self.stack.len() >= MAX_GOSUB_DEPTH {
            self.queued.push_back(Action::Log {
                level: LogLevel::Error,
                message: format!(
                    "line {line}: Gosub({args}): more than {MAX_GOSUB_DEPTH} nested: hanging up"
                ),
            });
            let a = self.end(34);
            self.queued.push_back(a);
            return;
        }
        let (target, sub_args) = split_gosub(args);
        let mut frame = Frame {
            context: self.context.clone(),
            exten: self.exten.clone(),
            priority: self.priority,
            saved: Vec::new(),
        };
        if let Err(e) = self.jump(&target) {
            self.queued.push_back(Action::Log {
                level: LogLevel::Warning,
                message: format!("line {line}: Gosub({args}): {e}"),
            });
            let a = self.end(16);
            self.queued.push_back(a);
            return;
        }
        // Arguments of an outer Gosub beyond this one's count read empty, as in Asterisk.
        let outer: usize = self.var("ARGC").and_then(|n| n.parse().ok()).unwrap_or(0);
        let count = sub_args.len();
        let mut values: Vec<(String, String)> = sub_args
            .into_iter()
            .enumerate()
            .map(|(i, a)| (format!("ARG{}", i + 1), a))
            .collect();
        values.extend((count + 1..=outer).map(|i| (format!("ARG{i}"), String::new())));
        values.push(("ARGC".into(), count.to_string()));
        for (name, value) in values {
            frame
                .saved
                .push((name.clone(), self.vars.get(&name).cloned()));
            self.vars.insert(name, value);
        }
        self.stack.push(frame);
    }

    /// Return: back after the Gosub, its arguments' variables as they were before,
    /// `${GOSUB_RETVAL}` set.
    fn gosub_return(&mut self, value: &str, line: usize) {
        let Some(frame) = self.stack.pop() else {
            self.queued.push_back(Action::Log {
                level: LogLevel::Warning,
                message: format!("line {line}: Return without Gosub: hanging up"),
            });
            let a = self.end(16);
            self.queued.push_back(a);
            return;
        };
        for (name, old) in frame.saved.into_iter().rev() {
            match old {
                Some(v) => self.vars.insert(name, v),
                None => self.vars.remove(&name),
            };
        }
        self.set_var("GOSUB_RETVAL", value.trim());
        self.context = frame.context;
        self.exten = frame.exten;
        self.priority = frame.priority;
        self.vars.insert("EXTEN".into(), self.exten.clone());
        self.vars.insert("CONTEXT".into(), self.context.clone());
    }

    /// Jumps to `target`; a target that does not exist ends the call, as in Asterisk.
    fn jump_or_end(&mut self, target: &str, app: &str, args: &str, line: usize) {
        if let Err(e) = self.jump(target) {
            self.queued.push_back(Action::Log {
                level: LogLevel::Warning,
                message: format!("line {line}: {app}({args}): {e}"),
            });
            let a = self.end(16);
            self.queued.push_back(a);
        }
    }

    /// `TIMEOUT(digit)` or `TIMEOUT(response)` as the channel has it.
    fn timeout(&self, which: &str) -> Duration {
        let key = timeout_var(which).unwrap_or("TIMEOUT(response)");
        self.vars
            .get(key)
            .and_then(|v| seconds(v))
            .unwrap_or_else(|| default_timeout(key))
    }

    /// The time for time conditions (`GotoIfTime`): Unix ms now, and the zone of
    /// conditions that name none. The call gives it before it runs the plan (sans-IO).
    pub fn set_clock(&mut self, unix_ms: u64, timezone: &str) {
        self.clock = Some((unix_ms as i64, timezone.to_string()));
    }

    /// The call is over: runs the `h` extension of the current context (once), as
    /// Asterisk does after a hangup, and returns what it logged. Only bookkeeping runs
    /// there (Set, Log, Goto, Gosub…): the first application that needs the call ends
    /// it.
    pub fn hangup_handler(&mut self, cause: u16) -> Vec<Action> {
        let mut logs = Vec::new();
        if self.in_hangup_handler || self.plan.find(&self.context, "h").is_none() {
            return logs;
        }
        self.in_hangup_handler = true;
        self.set_var("HANGUPCAUSE", &cause.to_string());
        let context = self.context.clone();
        self.collect = None;
        self.queued.clear();
        self.stack.clear();
        self.finished = false;
        self.go_to(&context, "h");
        // Bounded: a Log loop ends with a Hangup (see next_action).
        while let a @ Action::Log { .. } = self.next_action() {
            logs.push(a);
        }
        self.finished = true;
        logs
    }

    /// The channel's music-on-hold class: `Set(CHANNEL(musicclass)=…)`, else `default`.
    pub fn music_class(&self) -> String {
        self.var("CHANNEL(musicclass)")
            .filter(|c| !c.is_empty())
            .unwrap_or("default")
            .to_string()
    }

    /// Whether keys are being collected (Background, WaitExten, Read).
    pub fn collecting(&self) -> bool {
        self.collect.is_some()
    }

    /// A key the caller pressed while Background, WaitExten or Read runs.
    pub fn digit(&mut self, d: char) -> Collected {
        let digit_timeout = self.timeout("digit");
        match self.collect.as_mut() {
            None => Collected::Ignored,
            Some(Collect::Exten {
                context,
                digits,
                single,
            }) => {
                if *single && digits.is_empty() && self.plan.find(context, &d.to_string()).is_none()
                {
                    return Collected::Ignored;
                }
                digits.push(d);
                let (context, digits) = (context.clone(), digits.clone());
                if self.plan.can_match_more(&context, &digits) {
                    return Collected::More(digit_timeout);
                }
                self.choose_exten(&context, &digits);
                Collected::Done
            }
            Some(Collect::Read {
                var,
                digits,
                max,
                gap,
                ..
            }) => {
                // `#` ends the input; it is not part of it.
                if d == '#' {
                    let (var, digits) = (var.clone(), digits.clone());
                    self.read_done(&var, &digits, "OK");
                    return Collected::Done;
                }
                digits.push(d);
                if *max > 0 && digits.chars().count() >= *max {
                    let (var, digits) = (var.clone(), digits.clone());
                    self.read_done(&var, &digits, "OK");
                    return Collected::Done;
                }
                Collected::More(*gap)
            }
        }
    }

    /// The prompts of Background or Read ended with no key pressed: Background is done
    /// (the plan runs on), Read waits for the first digit.
    pub fn prompts_done(&mut self) -> Collected {
        match &self.collect {
            Some(Collect::Read {
                digits, timeout, ..
            }) if digits.is_empty() => Collected::More(*timeout),
            Some(Collect::Exten { digits, .. }) if digits.is_empty() => {
                self.collect = None;
                Collected::Done
            }
            // Keys already pressed: their own timer runs.
            Some(_) => Collected::Ignored,
            None => Collected::Done,
        }
    }

    /// The collection's timer ran out: the keys so far decide (an extension, `i` for
    /// one that does not exist, `t` for none at all; Read stores what it has).
    pub fn collect_timeout(&mut self) -> Collected {
        match self.collect.take() {
            None => Collected::Ignored,
            Some(Collect::Exten {
                context, digits, ..
            }) => {
                if digits.is_empty() {
                    // WaitExten heard nothing: `t`, or the call ends, as in Asterisk.
                    if self.plan.find(&context, "t").is_some() {
                        self.go_to(&context, "t");
                    } else {
                        self.queued.push_back(Action::Log {
                            level: LogLevel::Notice,
                            message: format!("timeout, and no extension t in [{context}]"),
                        });
                        let a = self.end(16);
                        self.queued.push_back(a);
                    }
                } else {
                    self.choose_exten(&context, &digits);
                }
                Collected::Done
            }
            Some(Collect::Read {
                var,
                digits,
                attempts,
                prompts,
                noanswer,
                max,
                timeout,
                gap,
            }) => {
                if digits.is_empty() && attempts > 1 {
                    // Another attempt: the prompts again.
                    self.collect = Some(Collect::Read {
                        var,
                        digits,
                        max,
                        timeout,
                        gap,
                        attempts: attempts - 1,
                        prompts: prompts.clone(),
                        noanswer,
                    });
                    self.queued.push_back(Action::Read {
                        prompts,
                        noanswer,
                        skip_unanswered: false,
                    });
                    return Collected::Done;
                }
                let status = if digits.is_empty() { "TIMEOUT" } else { "OK" };
                self.read_done(&var, &digits, status);
                Collected::Done
            }
        }
    }

    /// How a `Transfer` ended: `${TRANSFERSTATUS}` (`SUCCESS`, `FAILURE`, `UNSUPPORTED`)
    /// and `${TRANSFERSTATUSPROTOCOL}` (the SIP status, 0 without one).
    pub fn transfer_finished(&mut self, status: &str, sip: Option<u16>) {
        self.set_var("TRANSFERSTATUS", status);
        self.set_var("TRANSFERSTATUSPROTOCOL", &sip.unwrap_or(0).to_string());
    }

    /// How a `VoiceMail` ended: `${VMSTATUS}` (`SUCCESS`, `USEREXIT`, `FAILED`).
    pub fn voicemail_finished(&mut self, status: &str) {
        self.set_var("VMSTATUS", status);
    }

    /// Read was skipped (`s` on an unanswered call) or had no media to play on.
    pub fn read_skipped(&mut self, status: &str) {
        if let Some(Collect::Read { var, .. }) = self.collect.take() {
            self.read_done(&var, "", status);
        }
    }

    fn read_done(&mut self, var: &str, digits: &str, status: &str) {
        self.collect = None;
        if !var.is_empty() {
            self.assign(var, digits);
        }
        self.set_var("READSTATUS", status);
    }

    /// Keys `digits` were collected in `context`: that extension, else `i` (with
    /// `${INVALID_EXTEN}`), else the call ends.
    fn choose_exten(&mut self, context: &str, digits: &str) {
        self.collect = None;
        if self.plan.find(context, digits).is_some() {
            self.go_to(context, digits);
        } else if self.plan.find(context, "i").is_some() {
            self.set_var("INVALID_EXTEN", digits);
            self.go_to(context, "i");
        } else {
            self.queued.push_back(Action::Log {
                level: LogLevel::Notice,
                message: format!("invalid extension {digits:?}, and no extension i in [{context}]"),
            });
            let a = self.end(1);
            self.queued.push_back(a);
        }
    }

    /// To priority 1 of `exten` in `context` (known to exist).
    fn go_to(&mut self, context: &str, exten: &str) {
        self.context = context.to_string();
        self.exten = exten.to_string();
        self.priority = 1;
        self.vars.insert("EXTEN".into(), self.exten.clone());
        self.vars.insert("CONTEXT".into(), self.context.clone());
    }

    fn assign(&mut self, name: &str, value: &str) {
        // `_VAR`/`__VAR` mark inheritance in Asterisk; one channel here, so just VAR.
        let name = name.trim_start_matches('_');
        match name.to_ascii_uppercase().as_str() {
            "CALLERID(NUM)" | "CALLERID(NUMBER)" => self.caller.num = value.to_string(),
            "CALLERID(NAME)" => self.caller.name = value.to_string(),
            "CALLERID(ALL)" => self.caller = CallerId::parse(value),
            "CHANNEL(MUSICCLASS)" => {
                self.vars
                    .insert("CHANNEL(musicclass)".into(), value.trim().to_string());
            }
            upper if upper.starts_with("TIMEOUT(") && upper.ends_with(')') => {
                match timeout_var(&upper[8..upper.len() - 1]) {
                    Some(key) => {
                        self.vars.insert(key.to_string(), value.trim().to_string());
                    }
                    None => self.queued.push_back(Action::Log {
                        level: LogLevel::Warning,
                        message: format!(
                            "Set({name}): only TIMEOUT(digit) and TIMEOUT(response) are supported"
                        ),
                    }),
                }
            }
            _ => {
                self.vars.insert(name.to_string(), value.to_string());
            }
        }
    }

    fn dial(&mut self, parts: &[String], line: usize) -> Action {
        let arg = |i: usize| parts.get(i).map(|s| s.trim()).unwrap_or("");
        let targets: Result<Vec<DialTarget>, String> = arg(0)
            .split('&')
            .filter(|t| !t.trim().is_empty())
            .map(|t| parse_dial_target(t.trim()))
            .collect();
        let req = targets.and_then(|targets| {
            if targets.is_empty() {
                return Err("no targets".into());
            }
            let mut req = parse_dial_options(arg(2))?;
            req.targets = targets;
            req.timeout = seconds(arg(1));
            Ok(req)
        });
        match req {
            Ok(r) => Action::Dial(r),
            Err(e) => {
                self.set_var("DIALSTATUS", DialStatus::InvalidArgs.as_str());
                Action::Log {
                    level: LogLevel::Warning,
                    message: format!("line {line}: Dial({}): {e}", parts.join(",")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions_as_asterisk_names_them() {
        let d = |cause, answered| Disposition::of(cause, answered, None).cdr_name();
        assert_eq!(d(16, true), "ANSWERED");
        assert_eq!(d(17, true), "ANSWERED", "answered whatever ended it");
        assert_eq!(d(17, false), "BUSY");
        assert_eq!(
            d(16, false),
            "NO ANSWER",
            "the caller hung up while it rang"
        );
        assert_eq!(d(19, false), "NO ANSWER");
        assert_eq!(d(34, false), "CONGESTION");
        assert_eq!(d(1, false), "FAILED");
        let after_dial = |status| Disposition::of(21, false, Some(status)).cdr_name();
        assert_eq!(
            after_dial("BUSY"),
            "BUSY",
            "the dial's outcome, not the plan's Hangup(21)"
        );
        assert_eq!(after_dial("NOANSWER"), "NO ANSWER");
        assert_eq!(after_dial("CANCEL"), "NO ANSWER");
        assert_eq!(after_dial("CONGESTION"), "CONGESTION");
        assert_eq!(after_dial("CHANUNAVAIL"), "FAILED");
        assert_eq!(
            Disposition::of(16, true, Some("BUSY")).cdr_name(),
            "ANSWERED"
        );
    }

    fn run(src: &str, ctx: &str, exten: &str) -> Execution {
        let plan = Arc::new(Dialplan::parse(src).unwrap());
        Execution::start(
            plan,
            ctx,
            exten,
            CallerId {
                num: "1001".into(),
                name: "Alice".into(),
            },
        )
        .unwrap()
    }

    #[test]
    fn dial_then_branch_on_dialstatus() {
        let mut e = run(
            "[default]\n\
             exten => _1XXX,1,Dial(SIP/${EXTEN}&PJSIP/alice@10.0.0.9:5070,20,rf(\"Front\" <555>)t)\n \
             same => n,GotoIf($[\"${DIALSTATUS}\" = \"BUSY\"]?busy)\n \
             same => n,Hangup(19)\n \
             same => n(busy),Busy()\n",
            "default",
            "1002",
        );
        let Action::Dial(d) = e.next_action() else {
            panic!()
        };
        assert_eq!(
            d.targets,
            [
                DialTarget::User("1002".into()),
                DialTarget::Uri {
                    user: "alice".into(),
                    host: "10.0.0.9:5070".into()
                }
            ]
        );
        assert_eq!(d.timeout, Some(Duration::from_secs(20)));
        assert!(d.ringing);
        assert_eq!(d.transfer_by, [false, true], "t: the callee may transfer");
        assert_eq!(
            d.caller_id,
            Some(CallerId {
                num: "555".into(),
                name: "Front".into()
            })
        );
        let mut busy = e.clone();
        busy.dial_finished(DialStatus::Busy, Some(486));
        assert_eq!(busy.next_action(), Action::Busy);
        assert_eq!(busy.var("HANGUPCAUSE"), Some("17"));
        e.dial_finished(DialStatus::NoAnswer, None);
        assert_eq!(e.next_action(), Action::Hangup { cause: 19 });
        assert_eq!(e.next_action(), Action::Hangup { cause: 19 }, "stays ended");
    }

    #[test]
    fn variables_functions_and_set() {
        let mut e = run(
            "[globals]\nPREFIX=9\n[c]\n\
             exten => _9NXX,1,Set(N=${EXTEN:${LEN(${PREFIX})}})\n \
             same => n,Set(CALLERID(name)=Bob)\n \
             same => n,Log(NOTICE,${N} ${CALLERID(name)} <${CALLERID(num)}> $[${N} + 1] ${IF($[${N} > 500]?big:small)})\n",
            "c",
            "9555",
        );
        assert_eq!(
            e.next_action(),
            Action::Log {
                level: LogLevel::Notice,
                message: "555 Bob <1001> 556 big".into()
            }
        );
        assert_eq!(e.next_action(), Action::Hangup { cause: 16 }, "ran out");
    }

    #[test]
    fn goto_labels_and_includes() {
        let mut e = run(
            "[a]\ninclude => b\n\
             exten => 1,1,Goto(b,2,start)\n\
             [b]\n\
             exten => 2,1,Hangup(1)\n \
             same => n(start),Answer()\n \
             same => n,Playback(hello-world&beep,noanswer)\n \
             same => n,Wait(1.5)\n \
             same => n,Goto(s,1)\n\
             exten => s,1,Echo()\n",
            "a",
            "1",
        );
        assert_eq!(e.next_action(), Action::Answer);
        assert_eq!(
            e.next_action(),
            Action::Playback {
                prompts: vec!["hello-world".into(), "beep".into()],
                noanswer: true
            }
        );
        assert_eq!(e.next_action(), Action::Wait(Duration::from_millis(1500)));
        assert_eq!(e.next_action(), Action::Echo);
        assert_eq!(e.var("EXTEN"), Some("s"));
    }

    #[test]
    fn goto_loop_ends_the_call() {
        let mut e = run("[a]\nexten => 1,1,NoOp()\n same => n,Goto(1)\n", "a", "1");
        assert!(matches!(
            e.next_action(),
            Action::Log {
                level: LogLevel::Error,
                ..
            }
        ));
        assert_eq!(e.next_action(), Action::Hangup { cause: 34 });
    }

    #[test]
    fn unknown_extension_is_refused() {
        let plan = Arc::new(Dialplan::parse("[a]\nexten => 1,1,NoOp()\n").unwrap());
        assert!(Execution::start(plan.clone(), "a", "2", CallerId::default()).is_err());
        assert!(Execution::start(plan, "zz", "1", CallerId::default()).is_err());
    }

    const IVR: &str = "[ivr]\n\
        exten => s,1,Answer()\n \
         same => n,Set(TIMEOUT(digit)=2)\n \
         same => n,Background(welcome&menu)\n \
         same => n,WaitExten(7)\n\
        exten => 1,1,Log(NOTICE,sales)\n\
        exten => 12,1,Log(NOTICE,twelve)\n\
        exten => 2,1,Read(PIN,enter-pin,4,,2,3)\n \
         same => n,Log(NOTICE,pin ${PIN} ${READSTATUS})\n\
        exten => i,1,Log(NOTICE,invalid ${INVALID_EXTEN})\n\
        exten => t,1,Log(NOTICE,timeout)\n";

    fn notice(e: &mut Execution) -> String {
        match e.next_action() {
            Action::Log { message, .. } => message,
            other => panic!("expected a log, got {other:?}"),
        }
    }

    /// To the Background of the IVR above.
    fn ivr() -> Execution {
        let mut e = run(IVR, "ivr", "s");
        assert_eq!(e.next_action(), Action::Answer);
        assert_eq!(
            e.next_action(),
            Action::Background {
                prompts: vec!["welcome".into(), "menu".into()],
                noanswer: false,
                skip_unanswered: false
            }
        );
        assert!(e.collecting());
        e
    }

    #[test]
    fn a_key_during_background_chooses_the_extension() {
        // 1 could still become 12: wait TIMEOUT(digit), then take 1.
        let mut e = ivr();
        assert_eq!(e.digit('1'), Collected::More(Duration::from_secs(2)));
        assert_eq!(e.collect_timeout(), Collected::Done);
        assert_eq!(notice(&mut e), "sales");
        assert_eq!(e.var("EXTEN"), Some("1"));
        // 12 can become nothing longer: at once.
        let mut e = ivr();
        assert_eq!(e.digit('1'), Collected::More(Duration::from_secs(2)));
        assert_eq!(e.digit('2'), Collected::Done);
        assert_eq!(notice(&mut e), "twelve");
        // No such extension: i, with the keys in INVALID_EXTEN.
        let mut e = ivr();
        assert_eq!(e.digit('9'), Collected::Done);
        assert_eq!(notice(&mut e), "invalid 9");
        assert!(!e.collecting());
        assert_eq!(e.digit('1'), Collected::Ignored);
    }

    #[test]
    fn silence_after_the_prompts_goes_to_t() {
        let mut e = ivr();
        // The prompts end with no key: Background is done, WaitExten waits.
        assert_eq!(e.prompts_done(), Collected::Done);
        assert_eq!(
            e.next_action(),
            Action::WaitExten {
                timeout: Duration::from_secs(7),
                music: None
            }
        );
        assert_eq!(e.collect_timeout(), Collected::Done);
        assert_eq!(notice(&mut e), "timeout");
        // Without a t extension the call ends.
        let mut e = run(
            "[a]\nexten => s,1,WaitExten(1)\nexten => 5,1,NoOp()\n",
            "a",
            "s",
        );
        assert!(matches!(e.next_action(), Action::WaitExten { .. }));
        e.collect_timeout();
        assert!(matches!(e.next_action(), Action::Log { .. }));
        assert_eq!(e.next_action(), Action::Hangup { cause: 16 });
    }

    #[test]
    fn read_collects_digits_until_max_or_hash_and_tries_again_after_silence() {
        let to_read = || {
            let mut e = ivr();
            e.digit('2');
            assert_eq!(
                e.next_action(),
                Action::Read {
                    prompts: vec!["enter-pin".into()],
                    noanswer: false,
                    skip_unanswered: false
                }
            );
            e
        };
        let mut e = to_read();
        assert_eq!(e.prompts_done(), Collected::More(Duration::from_secs(3)));
        // Read's own timeout (3 s) between keys too, as in Asterisk.
        for d in "123".chars() {
            assert_eq!(e.digit(d), Collected::More(Duration::from_secs(3)));
        }
        assert_eq!(e.digit('4'), Collected::Done);
        assert_eq!(notice(&mut e), "pin 1234 OK");
        // # ends it early and is not kept.
        let mut e = to_read();
        e.digit('7');
        assert_eq!(e.digit('#'), Collected::Done);
        assert_eq!(notice(&mut e), "pin 7 OK");
        // Silence: the prompt again (2 attempts), then TIMEOUT.
        let mut e = to_read();
        e.prompts_done();
        assert_eq!(e.collect_timeout(), Collected::Done);
        assert!(matches!(e.next_action(), Action::Read { .. }));
        e.prompts_done();
        assert_eq!(e.collect_timeout(), Collected::Done);
        assert_eq!(notice(&mut e), "pin  TIMEOUT");
    }

    #[test]
    fn timeout_function_reads_and_sets() {
        let mut e = run(
            "[a]\nexten => s,1,Log(NOTICE,${TIMEOUT(digit)} ${TIMEOUT(response)})\n \
             same => n,Set(TIMEOUT(response)=4)\n \
             same => n,Log(NOTICE,${TIMEOUT(response)})\n",
            "a",
            "s",
        );
        assert_eq!(notice(&mut e), "5 10");
        assert_eq!(notice(&mut e), "4");
        let refused = Dialplan::parse("[a]\nexten => s,1,Set(TIMEOUT(absolute)=60)\n");
        assert!(
            format!("{refused:?}").contains("TIMEOUT(ABSOLUTE) is not supported"),
            "{refused:?}"
        );
    }

    #[test]
    fn background_m_takes_only_one_key_extensions() {
        let mut e = run(
            "[a]\nexten => s,1,Background(menu,m)\nexten => 1,1,NoOp()\n",
            "a",
            "s",
        );
        assert!(matches!(e.next_action(), Action::Background { .. }));
        assert_eq!(e.digit('7'), Collected::Ignored);
        assert_eq!(e.digit('1'), Collected::Done);
    }

    #[test]
    fn gosub_passes_arguments_returns_a_value_and_restores_the_callers_variables() {
        let mut e = run(
            "[a]\nexten => s,1,Set(ARG1=outer)\n \
             same => n,Gosub(sub-greet,s,1(alice,${CALLERID(num)}))\n \
             same => n,Log(NOTICE,back ${GOSUB_RETVAL} ${ARG1} ${EXTEN} ${ARGC})\n \
             same => n,Gosub(sub-greet,s,1(bob))\n \
             same => n,Log(NOTICE,back ${GOSUB_RETVAL} ${ARG1} ${EXTEN} ${ARGC})\n \
             same => n,Return()\n\
             [sub-greet]\n\
             exten => s,1,Log(NOTICE,hi ${ARG1} from ${ARG2} argc ${ARGC})\n \
             same => n,ExecIf($[${ARGC} > 1]?Gosub(sub-inner,s,1(x)))\n \
             same => n,Return(done-${ARG1})\n\
             [sub-inner]\n\
             exten => s,1,Log(NOTICE,inner ${ARG1} [${ARG2}] ${ARGC})\n \
             same => n,Return\n",
            "a",
            "s",
        );
        assert_eq!(notice(&mut e), "hi alice from 1001 argc 2");
        // Nested: the outer frame's ARG2 reads empty inside.
        assert_eq!(notice(&mut e), "inner x [] 1");
        assert_eq!(notice(&mut e), "back done-alice outer s ");
        assert_eq!(notice(&mut e), "hi bob from  argc 1");
        assert_eq!(notice(&mut e), "back done-bob outer s ");
        // Return without Gosub ends the call.
        assert!(notice(&mut e).contains("Return without Gosub"));
        assert_eq!(e.next_action(), Action::Hangup { cause: 16 });
    }

    #[test]
    fn runaway_gosub_recursion_ends_the_call() {
        let mut e = run("[a]\nexten => s,1,Gosub(s,1)\n", "a", "s");
        assert!(notice(&mut e).contains("nested"));
        assert_eq!(e.next_action(), Action::Hangup { cause: 34 });
    }

    #[test]
    fn execif_runs_the_branch_the_condition_picks() {
        let mut e = run(
            "[a]\nexten => s,1,Set(X=1)\n \
             same => n,ExecIf($[${X} = 1]?Log(NOTICE,yes: a,b):Log(NOTICE,no))\n \
             same => n,ExecIf($[${X} = 2]?Log(NOTICE,yes):Log(NOTICE,no))\n \
             same => n,ExecIf(0?Log(NOTICE,never))\n \
             same => n,ExecIf(1?Set(Y=2))\n \
             same => n,Log(NOTICE,Y=${Y})\n \
             same => n,ExecIf(1?Busy())\n",
            "a",
            "s",
        );
        assert_eq!(notice(&mut e), "yes: a,b");
        assert_eq!(notice(&mut e), "no");
        assert_eq!(notice(&mut e), "Y=2");
        assert_eq!(e.next_action(), Action::Busy);
    }

    #[test]
    fn gosub_and_execif_are_checked_when_the_plan_is_loaded() {
        let err = |src: &str| format!("{:?}", Dialplan::parse(src).unwrap_err());
        assert!(err("[a]\nexten => s,1,Gosub(nowhere,s,1(x))\n").contains("nowhere"));
        assert!(err("[a]\nexten => s,1,ExecIf(1?Frobnicate(x))\n").contains("Frobnicate"));
        assert!(err("[a]\nexten => s,1,ExecIf(1?Hangup(x))\n").contains("Hangup"));
        assert!(err("[a]\nexten => s,1,ExecIf(1)\n").contains("condition?App"));
    }

    #[test]
    fn numbers_and_digits_are_said_with_asterisks_prompts() {
        let say = |n| number_prompts(n).join(" ").replace("digits/", "");
        assert_eq!(say(0), "0");
        assert_eq!(say(7), "7");
        assert_eq!(say(15), "15");
        assert_eq!(say(40), "40");
        assert_eq!(say(42), "40 2");
        assert_eq!(say(100), "1 hundred");
        assert_eq!(say(1234), "1 thousand 2 hundred 30 4");
        assert_eq!(say(-5), "minus 5");
        assert_eq!(say(2_000_019), "2 million 19");
        assert_eq!(say(3_000_000_000), "3 billion");
        assert_eq!(say(i64::MIN).split(' ').count(), 20, "minus and 19 digits");
        assert_eq!(
            digit_prompts("1*#x0").join(" "),
            "digits/1 digits/star digits/pound digits/0"
        );
        let mut e = run(
            "[a]\nexten => s,1,SayNumber(21)\n same => n,SayDigits(${CALLERID(num)})\n",
            "a",
            "s",
        );
        assert_eq!(
            e.next_action(),
            Action::Playback {
                prompts: vec!["digits/20".into(), "digits/1".into()],
                noanswer: true
            }
        );
        assert!(matches!(e.next_action(), Action::Playback { prompts, .. } if prompts.len() == 4));
    }

    #[test]
    fn transfer_names_a_user_or_a_uri_and_a_bad_one_is_refused() {
        let mut e = run(
            "[a]\nexten => s,1,Transfer(SIP/bob)\n same => n,Transfer(carol)\n \
             same => n,Transfer(sip:dave@example.com)\n same => n,Transfer(PJSIP/eve@10.0.0.1:5080)\n",
            "a",
            "s",
        );
        assert_eq!(
            e.next_action(),
            Action::Transfer(DialTarget::User("bob".into()))
        );
        assert_eq!(
            e.next_action(),
            Action::Transfer(DialTarget::User("carol".into()))
        );
        assert_eq!(
            e.next_action(),
            Action::Transfer(DialTarget::Uri {
                user: "dave".into(),
                host: "example.com".into()
            })
        );
        assert!(
            matches!(e.next_action(), Action::Transfer(DialTarget::Uri { host, .. }) if host == "10.0.0.1:5080")
        );
        e.transfer_finished("SUCCESS", Some(200));
        assert_eq!(e.var("TRANSFERSTATUS"), Some("SUCCESS"));
        assert_eq!(e.var("TRANSFERSTATUSPROTOCOL"), Some("200"));
        for bad in ["Transfer()", "Transfer(IAX2/bob)", "Transfer(SIP/)"] {
            let err = Dialplan::parse(&format!("[a]\nexten => s,1,{bad}\n")).unwrap_err();
            assert!(err.to_string().contains("line 2:"), "{bad}: {err}");
        }
    }

    #[test]
    fn voicemail_takes_mailboxes_and_options_and_bad_ones_are_refused() {
        let mut e = run(
            "[a]\nexten => s,1,VoiceMail(1001&1002@sales,bg(5))\n \
             same => n,VoiceMail(${EXTEN}@default,su)\n \
             same => n,VoiceMailMain()\n same => n,VoiceMailMain(1001@sales,s)\n",
            "a",
            "s",
        );
        assert_eq!(
            e.next_action(),
            Action::VoiceMail {
                mailboxes: vec!["1001".into(), "1002@sales".into()],
                greeting: VmGreeting::Busy,
                skip_instructions: false,
            }
        );
        assert_eq!(
            e.next_action(),
            Action::VoiceMail {
                mailboxes: vec!["s".into()],
                greeting: VmGreeting::Unavailable,
                skip_instructions: true,
            }
        );
        assert_eq!(
            e.next_action(),
            Action::VoiceMailMain {
                mailbox: None,
                skip_pin: false
            }
        );
        assert_eq!(
            e.next_action(),
            Action::VoiceMailMain {
                mailbox: Some("1001@sales".into()),
                skip_pin: true
            }
        );
        e.voicemail_finished("SUCCESS");
        assert_eq!(e.var("VMSTATUS"), Some("SUCCESS"));
        for bad in [
            "VoiceMail()",
            "VoiceMail(1001,z)",
            "VoiceMail(10 01)",
            "VoiceMail(1001&)",
            "VoiceMail(1001,g(5)",
            "VoiceMailMain(a/b)",
            "VoiceMailMain(1001,u)",
        ] {
            let err = Dialplan::parse(&format!("[a]\nexten => s,1,{bad}\n")).unwrap_err();
            assert!(err.to_string().contains("line 2:"), "{bad}: {err}");
        }
    }

    #[test]
    fn music_on_hold_takes_the_channels_class() {
        let mut e = run(
            "[a]\nexten => s,1,MusicOnHold(,2.5)\n \
             same => n,Set(CHANNEL(musicclass)=jazz)\n \
             same => n,MusicOnHold()\n \
             same => n,MusicOnHold(rock)\n",
            "a",
            "s",
        );
        assert_eq!(
            e.next_action(),
            Action::MusicOnHold {
                class: "default".into(),
                duration: Some(Duration::from_millis(2500))
            }
        );
        assert_eq!(
            e.next_action(),
            Action::MusicOnHold {
                class: "jazz".into(),
                duration: None
            }
        );
        assert_eq!(e.music_class(), "jazz");
        assert!(matches!(e.next_action(), Action::MusicOnHold { class, .. } if class == "rock"));
        let refused = Dialplan::parse("[a]\nexten => s,1,Set(CHANNEL(language)=fr)\n");
        assert!(
            format!("{refused:?}").contains("CHANNEL(musicclass)"),
            "{refused:?}"
        );
        let refused = Dialplan::parse("[a]\nexten => s,1,MusicOnHold(../etc)\n");
        assert!(format!("{refused:?}").contains("class"), "{refused:?}");
    }

    #[test]
    fn gotoiftime_picks_the_branch_at_the_time_the_call_gives() {
        let plan = "[a]\nexten => s,1,GotoIfTime(09:00-17:00,mon-fri,*,*?open,1:closed,1)\n\
                    exten => open,1,Log(NOTICE,open)\n\
                    exten => closed,1,Log(NOTICE,closed)\n\
                    exten => b,1,GotoIfTime(*,*,25,dec,America/New_York?x)\n \
                    same => n,Log(NOTICE,not christmas in New York)\n \
                    same => n(x),Log(NOTICE,done)\n";
        // Friday 2026-12-04 10:00 UTC.
        let friday_10 = 1_796_378_400_000;
        let mut e = run(plan, "a", "s");
        e.set_clock(friday_10, "UTC");
        assert_eq!(notice(&mut e), "open");
        let mut e = run(plan, "a", "s");
        e.set_clock(friday_10, "Asia/Tokyo"); // 19:00 there
        assert_eq!(notice(&mut e), "closed");
        // 2026-12-25 03:00 UTC is still the 24th in New York.
        let mut e = run(plan, "a", "b");
        e.set_clock(1_798_167_600_000, "UTC");
        assert_eq!(notice(&mut e), "not christmas in New York");
        let mut e = run(plan, "a", "b");
        e.set_clock(1_798_167_600_000 + 6 * 3_600_000, "UTC");
        assert_eq!(notice(&mut e), "done");
        let refused = Dialplan::parse("[a]\nexten => s,1,GotoIfTime(25:00,*,*,*?s,1)\n");
        assert!(format!("{refused:?}").contains("time"), "{refused:?}");
    }

    #[test]
    fn the_h_extension_runs_once_after_the_hangup() {
        let mut e = run(
            "[a]\nexten => s,1,Answer()\n same => n,Echo()\n\
             exten => h,1,Log(NOTICE,bye ${CALLERID(num)} cause ${HANGUPCAUSE})\n \
             same => n,Set(X=1)\n \
             same => n,Log(NOTICE,x=${X})\n \
             same => n,Playback(beep)\n \
             same => n,Log(NOTICE,never)\n",
            "a",
            "s",
        );
        assert_eq!(e.next_action(), Action::Answer);
        assert_eq!(e.next_action(), Action::Echo);
        let logs: Vec<String> = e
            .hangup_handler(16)
            .into_iter()
            .map(|a| match a {
                Action::Log { message, .. } => message,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(logs, ["bye 1001 cause 16", "x=1"]);
        assert!(e.hangup_handler(16).is_empty(), "once");
        // No h: nothing.
        let mut e = run("[a]\nexten => s,1,Answer()\n", "a", "s");
        assert!(e.hangup_handler(16).is_empty());
    }

    #[test]
    fn a_log_and_goto_loop_ends_the_call() {
        let mut e = run(
            "[a]\nexten => s,1,Log(NOTICE,again)\n same => n,Goto(1)\n",
            "a",
            "s",
        );
        let mut logs = 0;
        loop {
            match e.next_action() {
                Action::Log { .. } => logs += 1,
                Action::Hangup { cause } => {
                    assert_eq!(cause, 34);
                    break;
                }
                other => panic!("{other:?}"),
            }
            assert!(logs <= MAX_SILENT_STEPS + 1, "never ends");
        }
        // Without keys Read waits TIMEOUT(digit) between them.
        let mut e = run("[a]\nexten => s,1,Read(X,,3)\n", "a", "s");
        assert!(matches!(e.next_action(), Action::Read { .. }));
        assert_eq!(e.prompts_done(), Collected::More(RESPONSE_TIMEOUT));
        assert_eq!(e.digit('1'), Collected::More(DIGIT_TIMEOUT));
    }

    #[test]
    fn causes_map_to_sip() {
        assert_eq!(cause_to_sip(17), 486);
        assert_eq!(cause_to_sip(19), 480);
        assert_eq!(cause_to_sip(34), 503);
        assert_eq!(cause_to_sip(1), 404);
        assert_eq!(DialStatus::from_sip(Some(486)), DialStatus::Busy);
        assert_eq!(DialStatus::from_sip(Some(503)), DialStatus::Congestion);
        assert_eq!(DialStatus::from_sip(None), DialStatus::ChanUnavail);
        assert_eq!(sip_to_cause(404), 1);
    }
}
