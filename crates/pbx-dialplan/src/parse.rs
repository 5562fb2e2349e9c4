//! The `extensions.conf` reader: `[context]`, `exten =>`, `same =>`, `include =>`,
//! `[globals]`; then a whole-dialplan check (includes, Goto targets, application
//! arguments) so that every error is found before anything is committed.

use std::collections::{BTreeMap, HashMap};

use crate::exec::{parse_dial_options, parse_goto, GotoTarget};
use crate::pattern::Pattern;
use crate::subst::{check, is_literal, split_top};
use crate::{App, Context, Dialplan, Extension, LineError, Priority};

/// Strips a `;` comment (`\;` is a literal semicolon).
fn strip_comment(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&';') => {
                out.push(';');
                chars.next();
            }
            ';' => break,
            c => out.push(c),
        }
    }
    out
}

enum Section {
    None,
    General,
    Globals,
    Context(String),
}

struct Reader {
    plan: Dialplan,
    errors: Vec<LineError>,
    /// (context, extension index) the last `exten`/`same` line added to.
    last: Option<(String, usize)>,
    includes: Vec<(String, String, usize)>,
}

impl Reader {
    fn err(&mut self, line: usize, reason: impl Into<String>) {
        self.errors.push(LineError {
            line,
            reason: reason.into(),
        });
    }
}

pub(crate) fn parse(source: &str) -> Result<Dialplan, Vec<LineError>> {
    let mut r = Reader {
        plan: Dialplan::default(),
        errors: Vec::new(),
        last: None,
        includes: Vec::new(),
    };
    let mut section = Section::None;
    for (idx, raw) in source.lines().enumerate() {
        let line_no = idx + 1;
        let line = strip_comment(raw);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('#') {
            r.err(
                line_no,
                format!(
                    "{line:?}: #include and #exec are not supported; put everything in one file"
                ),
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let Some(close) = rest.find(']') else {
                r.err(line_no, "'[' without ']' in a section header");
                continue;
            };
            let name = rest[..close].trim();
            if !rest[close + 1..].trim().is_empty() {
                r.err(
                    line_no,
                    format!("[{name}]: templates ('(...)' after a section) are not supported"),
                );
                continue;
            }
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
            {
                r.err(line_no, format!("invalid context name {name:?}"));
                continue;
            }
            r.last = None;
            section = match name {
                "general" => Section::General,
                "globals" => Section::Globals,
                n => {
                    r.plan
                        .contexts
                        .entry(n.to_string())
                        .or_insert_with(|| Context {
                            name: n.to_string(),
                            ..Context::default()
                        });
                    Section::Context(n.to_string())
                }
            };
            continue;
        }
        let (key, value) = match line.split_once("=>") {
            Some((k, v)) => (k.trim(), v.trim()),
            None => match line.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => {
                    r.err(line_no, format!("expected 'key => value', found {line:?}"));
                    continue;
                }
            },
        };
        match &section {
            Section::None => r.err(line_no, "a line outside of any [context]"),
            Section::General => {}
            Section::Globals => {
                if key.is_empty() || key.contains(char::is_whitespace) {
                    r.err(line_no, format!("invalid global variable name {key:?}"));
                } else if let Err(e) = check(value) {
                    r.err(line_no, e);
                } else {
                    r.plan.globals.insert(key.to_string(), value.to_string());
                }
            }
            Section::Context(ctx) => {
                let ctx = ctx.clone();
                let errors_before = r.errors.len();
                match key.to_ascii_lowercase().as_str() {
                    "exten" | "same" => {
                        exten_line(
                            &mut r,
                            &ctx,
                            value,
                            line_no,
                            key.eq_ignore_ascii_case("same"),
                        );
                        // `same` lines after a broken one must not attach elsewhere.
                        if r.errors.len() > errors_before {
                            r.last = None;
                        }
                    }
                    "include" => {
                        let target = value.split('|').next().unwrap_or("").trim();
                        if target.is_empty() {
                            r.err(line_no, "include => needs a context name");
                        } else {
                            r.includes.push((ctx, target.to_string(), line_no));
                        }
                    }
                    "ignorepat" => {}
                    "switch" | "lswitch" | "eswitch" => {
                        r.err(line_no, format!("{key} is not supported"))
                    }
                    _ => r.err(line_no, format!("unknown keyword {key:?} in a context")),
                }
            }
        }
    }
    for (ctx, target, line) in std::mem::take(&mut r.includes) {
        if !r.plan.contexts.contains_key(&target) {
            r.err(line, format!("include => {target}: no such context"));
        } else if let Some(c) = r.plan.contexts.get_mut(&ctx) {
            c.includes.push(target);
        }
    }
    for c in r.plan.contexts.values_mut() {
        c.extensions
            .sort_by(|a, b| a.pattern.specificity_cmp(&b.pattern));
    }
    check_plan(&mut r);
    if r.errors.is_empty() {
        Ok(r.plan)
    } else {
        r.errors.sort_by_key(|e| e.line);
        Err(r.errors)
    }
}

/// `pattern,priority[(label)],App(args)`; for `same`, `priority[(label)],App(args)`.
fn exten_line(r: &mut Reader, ctx: &str, value: &str, line: usize, same: bool) {
    let (pattern_text, rest) = if same {
        let Some((c, i)) = r.last.clone().filter(|(c, _)| c == ctx) else {
            r.err(
                line,
                "same => without a valid exten => before it in this context",
            );
            return;
        };
        let text = r.plan.contexts[&c].extensions[i].pattern.text.clone();
        (text, value.to_string())
    } else {
        match value.split_once(',') {
            Some((p, rest)) => (p.trim().to_string(), rest.to_string()),
            None => {
                r.err(line, "exten => needs pattern,priority,application");
                return;
            }
        }
    };
    let Some((prio_text, app_text)) = rest.split_once(',') else {
        r.err(line, "expected priority,application");
        return;
    };
    let prio_text = prio_text.trim();
    let app_text = app_text.trim();
    if prio_text.eq_ignore_ascii_case("hint") {
        return; // device state hints: nothing to run
    }
    if pattern_text.contains('/') {
        r.err(
            line,
            format!("{pattern_text}: caller-id matching ('/') is not supported"),
        );
        return;
    }
    let pattern = match Pattern::parse(&pattern_text) {
        Ok(p) => p,
        Err(e) => {
            r.err(line, e);
            return;
        }
    };
    let (prio_num, label) = match prio_text.find('(') {
        Some(p) if prio_text.ends_with(')') => (
            &prio_text[..p],
            Some(prio_text[p + 1..prio_text.len() - 1].trim().to_string()),
        ),
        Some(_) => {
            r.err(line, format!("priority {prio_text:?}: '(' without ')'"));
            return;
        }
        None => (prio_text, None),
    };
    if label.as_deref().is_some_and(|l| {
        l.is_empty()
            || !l
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }) {
        r.err(line, format!("invalid priority label in {prio_text:?}"));
        return;
    }
    let (app, args) = match split_app(app_text) {
        Ok(x) => x,
        Err(e) => {
            r.err(line, e);
            return;
        }
    };
    let Some(app) = App::from_name(&app) else {
        r.err(
            line,
            format!(
                "unknown application {app:?} (available: {})",
                App::names().collect::<Vec<_>>().join(", ")
            ),
        );
        return;
    };
    if let Err(e) = check(&args) {
        r.err(line, e);
        return;
    }
    let context = r
        .plan
        .contexts
        .get_mut(ctx)
        .expect("context created by its header");
    let existing = context
        .extensions
        .iter()
        .position(|e| e.pattern.text == pattern.text);
    let number = match prio_num.trim() {
        "n" | "N" => {
            let prev = existing
                .filter(|i| r.last.as_ref() == Some(&(ctx.to_string(), *i)))
                .and_then(|i| context.extensions[i].priorities.keys().next_back());
            match prev {
                Some(prev) => prev + 1,
                None => {
                    r.err(
                        line,
                        format!(
                            "priority 'n' of {} has no earlier priority to follow",
                            pattern.text
                        ),
                    );
                    r.last = None;
                    return;
                }
            }
        }
        "s" => {
            r.err(line, "priority 's' is not supported: use a number or 'n'");
            return;
        }
        t => match t.parse::<u32>() {
            Ok(n) if n >= 1 => n,
            _ => {
                r.err(line, format!("invalid priority {t:?}"));
                return;
            }
        },
    };
    let idx = match existing {
        Some(i) => i,
        None => {
            context.extensions.push(Extension {
                pattern,
                priorities: BTreeMap::new(),
                labels: HashMap::new(),
                line,
            });
            context.extensions.len() - 1
        }
    };
    let ext = &mut context.extensions[idx];
    if let Some(prev) = ext.priorities.get(&number) {
        let msg = format!(
            "priority {number} of extension {} is already defined at line {}",
            ext.pattern.text, prev.line
        );
        r.err(line, msg);
        return;
    }
    if let Some(l) = &label {
        if let Some(n) = ext.labels.get(l) {
            let msg = format!(
                "label {l:?} is already priority {n} of extension {}",
                ext.pattern.text
            );
            r.err(line, msg);
            return;
        }
        ext.labels.insert(l.clone(), number);
    }
    ext.priorities.insert(
        number,
        Priority {
            number,
            label,
            app,
            args,
            line,
        },
    );
    r.last = Some((ctx.to_string(), idx));
}

/// `App(args)` or `App`.
fn split_app(text: &str) -> Result<(String, String), String> {
    match text.find('(') {
        None => {
            if text.is_empty() || !text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid application {text:?}"));
            }
            Ok((text.to_string(), String::new()))
        }
        Some(p) => {
            if !text.ends_with(')') {
                return Err(format!("{text:?}: the arguments must end with ')'"));
            }
            Ok((
                text[..p].trim().to_string(),
                text[p + 1..text.len() - 1].to_string(),
            ))
        }
    }
}

/// Checks needing the whole dialplan: each extension starts at priority 1, Goto and
/// GotoIf targets exist, and literal application arguments make sense.
fn check_plan(r: &mut Reader) {
    let mut errors = Vec::new();
    for ctx in r.plan.contexts.values() {
        for ext in &ctx.extensions {
            if !ext.priorities.contains_key(&1) {
                errors.push(LineError {
                    line: ext.line,
                    reason: format!(
                        "extension {} in [{}] has no priority 1, so it can never run",
                        ext.pattern.text, ctx.name
                    ),
                });
            }
            for p in ext.priorities.values() {
                if let Err(reason) = check_args(&r.plan, ctx, ext, p) {
                    errors.push(LineError {
                        line: p.line,
                        reason: format!("{}({}): {reason}", p.app.name(), p.args),
                    });
                }
            }
        }
    }
    r.errors.extend(errors);
}

fn numeric(s: &str, what: &str) -> Result<(), String> {
    if is_literal(s) && !s.trim().is_empty() && s.trim().parse::<f64>().is_err() {
        return Err(format!("{what} must be a number, not {s:?}"));
    }
    Ok(())
}

fn check_goto(plan: &Dialplan, ctx: &Context, ext: &Extension, target: &str) -> Result<(), String> {
    if target.trim().is_empty() || !is_literal(target) {
        return Ok(());
    }
    let t: GotoTarget = parse_goto(target)?;
    let context_name = t.context.as_deref().unwrap_or(&ctx.name);
    let (c, e) = match &t.exten {
        None if t.context.is_none() => (ctx, ext),
        exten => {
            let exten = exten.as_deref().unwrap_or(&ext.pattern.text);
            if !plan.contexts.contains_key(context_name) {
                return Err(format!("no context {context_name:?}"));
            }
            // A pattern named literally as the target, or a dialled string it matches.
            let found = plan.contexts[context_name]
                .extensions
                .iter()
                .find(|e| e.pattern.text == exten)
                .map(|e| (&plan.contexts[context_name], e))
                .or_else(|| plan.find(context_name, exten));
            match found {
                Some(x) => x,
                None => return Err(format!("no extension {exten:?} in [{context_name}]")),
            }
        }
    };
    let ok = match t.priority.parse::<u32>() {
        Ok(n) => e.priorities.contains_key(&n),
        Err(_) => e.labels.contains_key(&t.priority),
    };
    if !ok {
        return Err(format!(
            "no priority or label {:?} in extension {} of [{}]",
            t.priority, e.pattern.text, c.name
        ));
    }
    Ok(())
}

/// Prompt names (`a&b`): letters, digits, `_-/`, no `..`.
fn check_prompts(list: &str) -> Result<(), String> {
    if !is_literal(list) {
        return Ok(());
    }
    for f in list.split('&') {
        if f.is_empty()
            || f.contains("..")
            || !f
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-/".contains(c))
        {
            return Err(format!("invalid prompt name {f:?}"));
        }
    }
    Ok(())
}

/// Single-letter options out of `allowed`.
fn check_options(opts: &str, allowed: &str) -> Result<(), String> {
    if !is_literal(opts) {
        return Ok(());
    }
    match opts.chars().find(|c| !allowed.contains(*c)) {
        Some(c) => Err(format!("unsupported option {c:?} (supported: {allowed})")),
        None => Ok(()),
    }
}

/// Voicemail options: the letters this node acts on, and Asterisk's gain and
/// directory options (`g(#)`, `d(c)`, `a(#)`, `p`, `U`, `P`), accepted and ignored so that
/// existing dialplans load.
fn check_vm_options(opts: &str, acted_on: &str) -> Result<(), String> {
    if !is_literal(opts) {
        return Ok(());
    }
    let mut rest = opts;
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        if rest.starts_with('(') {
            match rest.find(')') {
                Some(end) => rest = &rest[end + 1..],
                None => return Err(format!("option {c:?}: unclosed parenthesis")),
            }
        }
        if !acted_on.contains(c) && !"gdapUP".contains(c) {
            return Err(format!("unsupported option {c:?} (supported: {acted_on})"));
        }
    }
    Ok(())
}

fn check_args(plan: &Dialplan, ctx: &Context, ext: &Extension, p: &Priority) -> Result<(), String> {
    let args = split_top(&p.args, ',');
    let arg = |i: usize| args.get(i).map(|s| s.trim()).unwrap_or("");
    match p.app {
        App::Dial => {
            if arg(0).is_empty() {
                return Err("needs at least one target, e.g. SIP/bob".into());
            }
            if is_literal(arg(0)) {
                for t in arg(0).split('&') {
                    crate::exec::parse_dial_target(t.trim())?;
                }
            }
            numeric(arg(1), "the ring timeout")?;
            if is_literal(arg(2)) {
                parse_dial_options(arg(2))?;
            }
            if args.len() > 4 {
                return Err("takes targets, timeout, options, URL at most".into());
            }
        }
        App::Hangup => numeric(arg(0), "the cause")?,
        App::Busy | App::Congestion | App::Wait => numeric(arg(0), "the time")?,
        App::Playback | App::Background => {
            if arg(0).is_empty() {
                return Err("needs a prompt name".into());
            }
            check_prompts(arg(0))?;
            if p.app == App::Background {
                check_options(arg(1), "snm")?;
                if args.len() > 4 {
                    return Err("takes prompts, options, language, context at most".into());
                }
                if is_literal(arg(3)) && !arg(3).is_empty() && !plan.contexts.contains_key(arg(3)) {
                    return Err(format!("no context {:?}", arg(3)));
                }
            }
        }
        App::WaitExten => {
            numeric(arg(0), "the time")?;
            if args.len() > 2 {
                return Err("takes seconds and options at most".into());
            }
            let o = arg(1);
            let class_ok = |c: &str| {
                !c.is_empty()
                    && c.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            };
            let valid = o.is_empty()
                || o == "m"
                || o.strip_prefix("m(")
                    .and_then(|c| c.strip_suffix(')'))
                    .is_some_and(class_ok);
            if is_literal(o) && !valid {
                return Err(format!(
                    "unsupported option {o:?} (supported: m, m(class): music on hold while waiting)"
                ));
            }
        }
        App::Read => {
            // Read(variable[,prompts[,maxdigits[,options[,attempts[,timeout]]]]])
            if arg(0).is_empty() {
                return Err("needs a variable to read into".into());
            }
            if !arg(1).is_empty() {
                check_prompts(arg(1))?;
            }
            numeric(arg(2), "maxdigits")?;
            check_options(arg(3), "sn")?;
            numeric(arg(4), "attempts")?;
            numeric(arg(5), "the timeout")?;
            if args.len() > 6 {
                return Err(
                    "takes variable, prompts, maxdigits, options, attempts, timeout at most".into(),
                );
            }
        }
        App::Goto => check_goto(plan, ctx, ext, &p.args)?,
        App::Gosub => {
            let (target, _) = crate::exec::split_gosub(&p.args);
            check_goto(plan, ctx, ext, &target)?;
        }
        App::Return | App::SayDigits => {}
        App::Transfer => {
            if arg(0).is_empty() {
                return Err("needs a destination, e.g. SIP/bob".into());
            }
            if is_literal(arg(0)) {
                crate::exec::parse_transfer_target(arg(0))?;
            }
            if args.len() > 2 {
                return Err("takes a destination and options at most".into());
            }
        }
        App::GotoIfTime => {
            let parts = split_top(&p.args, '?');
            if parts.len() != 2 {
                return Err(
                    "expected times,weekdays,mdays,months[,timezone]?[label1][:label2]".into(),
                );
            }
            if is_literal(&parts[0]) {
                crate::timing::TimeSpec::parse(&parts[0])?;
            }
            for target in split_top(&parts[1], ':') {
                if !target.trim().is_empty() {
                    check_goto(plan, ctx, ext, &target)?;
                }
            }
        }
        App::VoiceMail => {
            if arg(0).is_empty() {
                return Err("needs a mailbox, e.g. 1001 or 1001@sales".into());
            }
            if is_literal(arg(0)) {
                for m in arg(0).split('&') {
                    crate::exec::mailbox_spec(m.trim())?;
                }
            }
            check_vm_options(arg(1), "bsu")?;
            if args.len() > 2 {
                return Err("takes mailboxes and options at most".into());
            }
        }
        App::VoiceMailMain => {
            if is_literal(arg(0)) && !arg(0).is_empty() {
                crate::exec::mailbox_spec(arg(0))?;
            }
            check_vm_options(arg(1), "s")?;
            if args.len() > 2 {
                return Err("takes a mailbox and options at most".into());
            }
        }
        App::MusicOnHold => {
            if is_literal(arg(0))
                && !arg(0)
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!("{:?} is not a music class name", arg(0)));
            }
            numeric(arg(1), "the duration")?;
        }
        App::SayNumber => {
            if is_literal(arg(0)) && arg(0).parse::<i64>().is_err() {
                return Err(format!("{:?} is not a whole number", arg(0)));
            }
            if args.len() > 2 {
                return Err("takes a number and a gender at most".into());
            }
        }
        App::ExecIf => {
            let parts = split_top(&p.args, '?');
            if parts.len() != 2 {
                return Err("expected condition?App(args)[:App(args)]".into());
            }
            for branch in split_top(&parts[1], ':') {
                if branch.trim().is_empty() {
                    continue;
                }
                let (app, args) = crate::exec::split_app_call(&branch)?;
                if app == App::ExecIf {
                    return Err("ExecIf cannot run ExecIf".into());
                }
                let inner = Priority {
                    app,
                    args,
                    ..p.clone()
                };
                check_args(plan, ctx, ext, &inner).map_err(|e| format!("{}: {e}", app.name()))?;
            }
        }
        App::GotoIf => {
            let parts = split_top(&p.args, '?');
            if parts.len() != 2 {
                return Err("expected condition?label1[:label2]".into());
            }
            for target in split_top(&parts[1], ':') {
                check_goto(plan, ctx, ext, &target)?;
            }
        }
        App::Set => {
            let Some((name, _)) = p.args.split_once('=') else {
                return Err("expected name=value".into());
            };
            let name = name.trim().to_ascii_uppercase();
            if let Some(field) = name
                .strip_prefix("CHANNEL(")
                .and_then(|w| w.strip_suffix(')'))
            {
                if is_literal(field) && field.trim() != "MUSICCLASS" {
                    return Err(format!(
                        "CHANNEL({}) is not supported: only CHANNEL(musicclass)",
                        field.to_ascii_lowercase()
                    ));
                }
            }
            if let Some(which) = name
                .strip_prefix("TIMEOUT(")
                .and_then(|w| w.strip_suffix(')'))
            {
                if is_literal(which) && !["DIGIT", "RESPONSE"].contains(&which.trim()) {
                    return Err(format!(
                        "TIMEOUT({which}) is not supported: TIMEOUT(digit) or TIMEOUT(response)"
                    ));
                }
            }
        }
        App::Log => {
            let level = arg(0).to_ascii_uppercase();
            if is_literal(arg(0))
                && !["ERROR", "WARNING", "NOTICE", "DEBUG", "VERBOSE", "DTMF"]
                    .contains(&level.as_str())
            {
                return Err(format!("unknown log level {:?}", arg(0)));
            }
        }
        App::Answer | App::Ringing | App::Progress | App::Echo | App::NoOp | App::Verbose => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::{App, Dialplan, DialplanError};

    fn errors(src: &str) -> Vec<(usize, String)> {
        match Dialplan::parse(src) {
            Ok(_) => Vec::new(),
            Err(DialplanError::Invalid(v)) => v.into_iter().map(|e| (e.line, e.reason)).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn asterisk_syntax() {
        let d = Dialplan::parse(
            "[general]\nstatic=yes\n\n[globals]\nTRUNK=SIP/provider\n\n\
             [internal] ; comment\n\
             exten => 100,1,Answer()\n \
             same => n(loop),Playback(hello-world)\n \
             same => n,Goto(loop)\n\
             exten = 200,1,NoOp(a\\;b)\n\
             exten => 200,2,Hangup\n\
             exten => _1XX,hint,SIP/bob\n\
             include => other\n\
             [other]\n\
             exten => _X.,1,Dial(SIP/${EXTEN}&PJSIP/alice,20,r)\n",
        )
        .unwrap();
        assert_eq!(d.globals["TRUNK"], "SIP/provider");
        let c = &d.contexts["internal"];
        let e = c
            .extensions
            .iter()
            .find(|e| e.pattern.text == "100")
            .unwrap();
        assert_eq!(e.priorities.len(), 3);
        assert_eq!(e.labels["loop"], 2);
        assert_eq!(e.priorities[&3].app, App::Goto);
        let e = c
            .extensions
            .iter()
            .find(|e| e.pattern.text == "200")
            .unwrap();
        assert_eq!(e.priorities[&1].args, "a;b");
        assert_eq!(c.includes, ["other"]);
        let (ctx, ext) = d.find("internal", "555").unwrap();
        assert_eq!(
            (ctx.name.as_str(), ext.pattern.text.as_str()),
            ("other", "_X.")
        );
    }

    #[test]
    fn every_error_with_its_line() {
        let e = errors(
            "exten => 1,1,NoOp\n\
             [a]\n\
             exten => 1,1,Frobnicate()\n\
             exten => 2,1,Dial()\n\
             exten => 3,n,NoOp()\n\
             same => n,NoOp()\n\
             exten => 4,1,Goto(nowhere,1,1)\n\
             exten => 5,1,Set(${EXTEN)\n\
             include => missing\n\
             exten => _[12,1,NoOp()\n\
             exten => 6,1,NoOp()\n\
             exten => 6,1,NoOp()\n\
             exten => 7,2,NoOp()\n\
             exten => 8,1,Hangup(abc)\n\
             exten => 9,1,Dial(IAX2/bob)\n\
             exten => 10,1,GotoIf($[1=1]?nolabel)\n",
        );
        let lines: Vec<usize> = e.iter().map(|(l, _)| *l).collect();
        assert_eq!(
            lines,
            [1, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16],
            "{e:#?}"
        );
        assert!(e[1].1.contains("unknown application \"Frobnicate\""));
        assert!(e[2].1.contains("at least one target"));
        assert!(e[5].1.contains("no context \"nowhere\""));
        assert!(e[9].1.contains("already defined at line 11"));
        assert!(e[10].1.contains("no priority 1"));
        assert!(e[13].1.contains("nolabel"));
    }

    #[test]
    fn goto_targets_are_checked() {
        let ok = "[a]\nexten => s,1,Goto(b,100,1)\nexten => t,1,Goto(b,555,next)\n\
                  [b]\nexten => 100,1,NoOp()\nexten => _5XX,1,NoOp()\n same => n(next),NoOp()\n";
        assert_eq!(errors(ok), Vec::new());
        let bad = "[a]\nexten => s,1,Goto(b,100,9)\n[b]\nexten => 100,1,NoOp()\n";
        assert_eq!(errors(bad).len(), 1);
    }
}
