//! Asterisk `extensions.conf` dialplans, sans-IO.
//!
//! [`Dialplan::parse`] reads the text and validates all of it (every error with its line
//! and reason, so a bad dialplan never replaces a good one); [`Execution`] runs a call
//! through it: it evaluates `Set`, `Goto`, `GotoIf`, `NoOp` and expressions itself and
//! yields the applications that need the call (Answer, Dial, Playback, …) as
//! [`Action`]s for the B2BUA to carry out, then takes their results (`DIALSTATUS`).

mod exec;
mod expr;
mod parse;
mod pattern;
mod subst;
mod timing;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

pub use exec::{
    cause_to_sip, digit_prompts, mailbox_spec, number_prompts, sip_to_cause, Action, CallerId,
    Collected, DialRequest, DialStatus, DialTarget, Disposition, Execution, LogLevel, VmGreeting,
    BLIND_TRANSFER_KEYS, DIGIT_TIMEOUT, RESPONSE_TIMEOUT,
};
pub use expr::evaluate as evaluate_expression;
pub use pattern::Pattern;
pub use timing::{valid_timezone, TimeSpec};

/// One problem in a dialplan, at a line (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// Errors of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialplanError {
    #[error("invalid dialplan: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<LineError>),
    #[error("no extension {exten:?} in context {context:?}")]
    NoSuchExtension { context: String, exten: String },
    #[error("no context {0:?}")]
    NoSuchContext(String),
}

/// One step of an extension: `exten => 100,2(label),Dial(SIP/bob,30)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priority {
    pub number: u32,
    pub label: Option<String>,
    pub app: App,
    /// The arguments as written; variables are substituted when the step runs.
    pub args: String,
    pub line: usize,
}

/// The applications a dialplan may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    Answer,
    Ringing,
    Progress,
    Dial,
    Hangup,
    Busy,
    Congestion,
    Playback,
    Echo,
    Wait,
    Goto,
    GotoIf,
    Set,
    NoOp,
    Log,
    Verbose,
    Background,
    WaitExten,
    Read,
    Gosub,
    Return,
    ExecIf,
    SayDigits,
    SayNumber,
    MusicOnHold,
    GotoIfTime,
    Transfer,
    VoiceMail,
    VoiceMailMain,
}

impl App {
    const ALL: &'static [(&'static str, App)] = &[
        ("Answer", App::Answer),
        ("Ringing", App::Ringing),
        ("Progress", App::Progress),
        ("Dial", App::Dial),
        ("Hangup", App::Hangup),
        ("Busy", App::Busy),
        ("Congestion", App::Congestion),
        ("Playback", App::Playback),
        ("Echo", App::Echo),
        ("Wait", App::Wait),
        ("Goto", App::Goto),
        ("GotoIf", App::GotoIf),
        ("Set", App::Set),
        ("NoOp", App::NoOp),
        ("Log", App::Log),
        ("Verbose", App::Verbose),
        ("Background", App::Background),
        ("WaitExten", App::WaitExten),
        ("Read", App::Read),
        ("Gosub", App::Gosub),
        ("Return", App::Return),
        ("ExecIf", App::ExecIf),
        ("SayDigits", App::SayDigits),
        ("SayNumber", App::SayNumber),
        ("MusicOnHold", App::MusicOnHold),
        ("GotoIfTime", App::GotoIfTime),
        ("Transfer", App::Transfer),
        ("VoiceMail", App::VoiceMail),
        ("VoiceMailMain", App::VoiceMailMain),
    ];

    /// Application names are case-insensitive, as in Asterisk.
    pub fn from_name(name: &str) -> Option<App> {
        Self::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, a)| *a)
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, a)| *a == self)
            .map_or("?", |(n, _)| n)
    }

    pub fn names() -> impl Iterator<Item = &'static str> {
        Self::ALL.iter().map(|(n, _)| *n)
    }
}

/// An extension (name or pattern) with its priorities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub pattern: Pattern,
    pub priorities: BTreeMap<u32, Priority>,
    pub labels: HashMap<String, u32>,
    pub line: usize,
}

/// A `[context]`: its extensions, most specific first, and its includes in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Context {
    pub name: String,
    pub extensions: Vec<Extension>,
    pub includes: Vec<String>,
}

/// A whole, validated dialplan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dialplan {
    pub contexts: BTreeMap<String, Context>,
    /// `[globals]`: variables every call starts with.
    pub globals: BTreeMap<String, String>,
}

impl Dialplan {
    /// Extensions over all contexts (for summaries).
    pub fn extension_count(&self) -> usize {
        self.contexts.values().map(|c| c.extensions.len()).sum()
    }

    /// Parses and validates `source`; every problem is reported with its line.
    pub fn parse(source: &str) -> Result<Dialplan, DialplanError> {
        parse::parse(source).map_err(DialplanError::Invalid)
    }

    /// The extension `exten` dialled in `context` reaches: the context's own extensions
    /// in Asterisk's order first, then its includes, depth first, each context once.
    pub fn find(&self, context: &str, exten: &str) -> Option<(&Context, &Extension)> {
        let mut seen = Vec::new();
        self.find_in(context, exten, &mut seen)
    }

    /// Whether digits longer than `exten` could still reach an extension of `context`
    /// (or of its includes): digit collection waits for more while this holds.
    pub fn can_match_more(&self, context: &str, exten: &str) -> bool {
        let mut seen = Vec::new();
        self.more_in(context, exten, &mut seen)
    }

    fn more_in(&self, context: &str, exten: &str, seen: &mut Vec<String>) -> bool {
        if seen.iter().any(|s| s == context) {
            return false;
        }
        seen.push(context.to_string());
        let Some(ctx) = self.contexts.get(context) else {
            return false;
        };
        ctx.extensions
            .iter()
            .any(|e| e.pattern.can_match_more(exten))
            || ctx
                .includes
                .iter()
                .any(|inc| self.more_in(inc, exten, seen))
    }

    fn find_in<'a>(
        &'a self,
        context: &str,
        exten: &str,
        seen: &mut Vec<String>,
    ) -> Option<(&'a Context, &'a Extension)> {
        if seen.iter().any(|s| s == context) {
            return None;
        }
        seen.push(context.to_string());
        let ctx = self.contexts.get(context)?;
        if let Some(e) = ctx.extensions.iter().find(|e| e.pattern.matches(exten)) {
            return Some((ctx, e));
        }
        ctx.includes
            .iter()
            .find_map(|inc| self.find_in(inc, exten, seen))
    }
}

/// The demo dialplan the local launcher and a fresh cluster start with: any user by
/// name or number, an echo test at 600 and a prompt at 700.
pub const DEMO_DIALPLAN: &str = include_str!("demo.conf");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_dialplan_is_valid() {
        let d = Dialplan::parse(DEMO_DIALPLAN).unwrap();
        assert!(d.find("default", "600").is_some());
        assert!(d.find("default", "700").is_some());
        assert!(d.find("default", "alice").is_some());
        assert!(d.find("default", "1001").is_some());
        assert!(d.find("default", "800").is_some());
        assert!(d.find("demo-menu", "i").is_some());
    }

    /// Every prompt the Say applications name and the demo plays is shipped, in both
    /// codecs (deploy/sounds: tones from `generate`, speech from `speak`).
    #[test]
    fn the_prompts_the_applications_name_are_shipped() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/sounds");
        let mut names: Vec<String> = (-20..=120)
            .chain([1000, 1_000_000, 1_000_000_000])
            .flat_map(number_prompts)
            .chain(digit_prompts("0123456789*#"))
            .collect();
        names.extend(
            [
                "hello-world",
                "beep",
                "silence-1",
                "busy",
                "pbx-invalid",
                "goodbye",
                "vm-intro",
            ]
            .map(String::from),
        );
        for name in names {
            for ext in ["ulaw", "alaw"] {
                let f = dir.join(format!("{name}.{ext}"));
                let len = std::fs::metadata(&f).map_or(0, |m| m.len());
                assert!(len > 800, "{}: missing or shorter than 0.1 s", f.display());
            }
        }
    }
}
