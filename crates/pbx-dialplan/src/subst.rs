//! `${VAR}`, `${VAR:offset:length}`, `${FUNC(args)}` and `$[expression]` substitution,
//! innermost first, as Asterisk does before an application sees its arguments.

use crate::expr;

/// Where substitution finds variables and functions.
pub(crate) trait Lookup {
    fn var(&self, name: &str) -> Option<String>;
    /// `None` when the function does not exist.
    fn func(&self, name: &str, args: &str) -> Option<Result<String, String>>;
}

/// Functions a dialplan may call (checked when the dialplan is validated).
pub(crate) const FUNCTIONS: &[&str] = &["CALLERID", "LEN", "IF", "ISNULL", "TIMEOUT"];

/// Index of the bracket closing the one opened just before `from` (`open`/`close`),
/// honouring nesting.
fn closing(b: &[char], from: usize, open: char, close: char) -> Option<usize> {
    let mut depth = 1;
    let mut i = from;
    while i < b.len() {
        if b[i] == open {
            depth += 1;
        } else if b[i] == close {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
        i += 1;
    }
    None
}

/// Substitutes everything; problems (unknown function, bad expression) are reported in
/// `warnings` and substitute as empty, as Asterisk does.
pub(crate) fn substitute(s: &str, vars: &dyn Lookup, warnings: &mut Vec<String>) -> String {
    let b: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == '\\' && i + 1 < b.len() && (b[i + 1] == '$' || b[i + 1] == '\\') {
            out.push(b[i + 1]);
            i += 2;
            continue;
        }
        if b[i] == '$' && i + 1 < b.len() && (b[i + 1] == '{' || b[i + 1] == '[') {
            let (open, close) = if b[i + 1] == '{' {
                ('{', '}')
            } else {
                ('[', ']')
            };
            match closing(&b, i + 2, open, close) {
                Some(end) => {
                    let inner: String = b[i + 2..end].iter().collect();
                    let inner = substitute(&inner, vars, warnings);
                    if open == '{' {
                        out.push_str(&variable(&inner, vars, warnings));
                    } else {
                        match expr::evaluate(&inner) {
                            Ok(v) => out.push_str(&v),
                            Err(e) => warnings.push(format!("$[{inner}]: {e}")),
                        }
                    }
                    i = end + 1;
                }
                None => {
                    // Unbalanced: left as written (validation refuses literal ones).
                    out.extend(&b[i..]);
                    break;
                }
            }
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// `NAME`, `NAME:off[:len]`, `FUNC(args)`, `FUNC(args):off[:len]`.
fn variable(inner: &str, vars: &dyn Lookup, warnings: &mut Vec<String>) -> String {
    let (value, rest) = match inner.find('(') {
        Some(open)
            if inner[..open]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            let b: Vec<char> = inner.chars().collect();
            let open_c = inner[..open].chars().count();
            let Some(close) = closing(&b, open_c + 1, '(', ')') else {
                warnings.push(format!("${{{inner}}}: '(' without ')'"));
                return String::new();
            };
            let name = &inner[..open];
            let args: String = b[open_c + 1..close].iter().collect();
            let rest: String = b[close + 1..].iter().collect();
            let v = match vars.func(&name.to_ascii_uppercase(), &args) {
                Some(Ok(v)) => v,
                Some(Err(e)) => {
                    warnings.push(format!("{name}({args}): {e}"));
                    String::new()
                }
                None => {
                    warnings.push(format!("unknown function {name}"));
                    String::new()
                }
            };
            (v, rest)
        }
        _ => {
            let (name, rest) = match inner.find(':') {
                Some(c) => (&inner[..c], inner[c..].to_string()),
                None => (inner, String::new()),
            };
            (vars.var(name).unwrap_or_default(), rest)
        }
    };
    match rest.strip_prefix(':') {
        Some(spec) => substring(&value, spec),
        None => value,
    }
}

/// Asterisk's `:offset[:length]`: a negative offset counts from the end, a negative
/// length leaves that many characters off the end.
fn substring(value: &str, spec: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    let n = chars.len() as i64;
    let mut parts = spec.splitn(2, ':');
    let off: i64 = parts
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let len: Option<i64> = parts.next().and_then(|s| s.trim().parse().ok());
    let start = if off < 0 {
        (n + off).max(0)
    } else {
        off.min(n)
    };
    let end = match len {
        None => n,
        Some(l) if l < 0 => (n + l).max(start),
        Some(l) => (start + l).min(n),
    };
    chars[start as usize..end as usize].iter().collect()
}

/// Splits `s` at `sep` where it is not inside `${}`, `$[]`, `()` or quotes.
pub(crate) fn split_top(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0i32;
    let mut quoted = false;
    let mut prev = '\0';
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            '{' | '[' | '(' if !quoted => depth += 1,
            '}' | ']' | ')' if !quoted => depth -= 1,
            c if c == sep && depth <= 0 && !quoted && prev != '\\' => {
                out.push(std::mem::take(&mut cur));
                prev = c;
                continue;
            }
            _ => {}
        }
        cur.push(c);
        prev = c;
    }
    out.push(cur);
    out
}

/// Checks the substitutions in `s` when the dialplan is loaded: balanced `${}` and
/// `$[]`, known functions, and expressions without variables that parse.
pub(crate) fn check(s: &str) -> Result<(), String> {
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        if b[i] == '$' && i + 1 < b.len() && (b[i + 1] == '{' || b[i + 1] == '[') {
            let (open, close) = if b[i + 1] == '{' {
                ('{', '}')
            } else {
                ('[', ']')
            };
            let end = closing(&b, i + 2, open, close)
                .ok_or_else(|| format!("'${open}' without '{close}'"))?;
            let inner: String = b[i + 2..end].iter().collect();
            check(&inner)?;
            if open == '{' {
                if let Some(p) = inner.find('(') {
                    let name = &inner[..p];
                    if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !FUNCTIONS.contains(&name.to_ascii_uppercase().as_str())
                    {
                        return Err(format!(
                            "unknown function {name} (known: {})",
                            FUNCTIONS.join(", ")
                        ));
                    }
                }
            } else if !inner.contains("${") && !inner.contains("$[") {
                expr::evaluate(&inner).map_err(|e| format!("$[{inner}]: {e}"))?;
            }
            i = end + 1;
            continue;
        }
        i += 1;
    }
    Ok(())
}

/// Whether `s` holds anything substituted at run time.
pub(crate) fn is_literal(s: &str) -> bool {
    !s.contains("${") && !s.contains("$[")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Vars(HashMap<&'static str, &'static str>);

    impl Lookup for Vars {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|s| s.to_string())
        }
        fn func(&self, name: &str, args: &str) -> Option<Result<String, String>> {
            match name {
                "LEN" => Some(Ok(args.chars().count().to_string())),
                _ => None,
            }
        }
    }

    fn sub(s: &str) -> (String, Vec<String>) {
        let v = Vars(HashMap::from([
            ("EXTEN", "918005551212"),
            ("X", "2"),
            ("NAME", "EXTEN"),
        ]));
        let mut w = Vec::new();
        (substitute(s, &v, &mut w), w)
    }

    #[test]
    fn variables_and_substrings() {
        assert_eq!(sub("${EXTEN}").0, "918005551212");
        assert_eq!(sub("${EXTEN:1}").0, "18005551212", "Asterisk: strip the 9");
        assert_eq!(sub("${EXTEN:-4}").0, "1212", "last four digits");
        assert_eq!(sub("${EXTEN:1:3}").0, "180");
        assert_eq!(sub("${EXTEN:-4:2}").0, "12");
        assert_eq!(sub("${EXTEN:0:-4}").0, "91800555");
        assert_eq!(sub("${EXTEN:${X}}").0, "8005551212", "nested");
        assert_eq!(sub("${${NAME}}").0, "918005551212", "indirect");
        assert_eq!(sub("${NOPE}x").0, "x", "unset is empty");
        assert_eq!(sub("SIP/${EXTEN:-4}@host").0, "SIP/1212@host");
        assert_eq!(sub("\\${EXTEN}").0, "${EXTEN}", "escaped");
    }

    #[test]
    fn functions_and_expressions() {
        assert_eq!(sub("${LEN(${EXTEN})}").0, "12");
        assert_eq!(sub("$[${X} + 3]").0, "5");
        assert_eq!(sub("$[${LEN(abc)} * ${X}]").0, "6");
        let (v, w) = sub("${FOO(1)}");
        assert_eq!(v, "");
        assert_eq!(w.len(), 1);
        let (v, w) = sub("$[1 +]");
        assert_eq!(v, "");
        assert!(w[0].contains("missing"), "{w:?}");
    }

    #[test]
    fn top_level_split() {
        assert_eq!(
            split_top("$[${A} = 1]?yes:no", '?'),
            vec!["$[${A} = 1]".to_string(), "yes:no".to_string()]
        );
        assert_eq!(split_top("a,\"b,c\",d(e,f)", ',').len(), 3);
    }

    #[test]
    fn load_time_checks() {
        assert!(check("${EXTEN").is_err());
        assert!(check("$[1 + ]").is_err());
        assert!(check("${FOO(1)}").unwrap_err().contains("unknown function"));
        assert!(
            check("$[${X} + ]").is_ok(),
            "depends on run time: not judged"
        );
        assert!(check("${CALLERID(num)} ${LEN(x)} $[1+2]").is_ok());
    }
}
