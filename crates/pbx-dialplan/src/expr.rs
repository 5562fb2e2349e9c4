//! Asterisk's `$[...]` expressions: `|`, `&`, comparisons (`=`, `==`, `!=`, `<`, `>`,
//! `<=`, `>=`), `+ - * / %`, unary `-` and `!`, parentheses and the ternary
//! `cond ? a :: b`. Operands are numbers or strings (quoted with `"` when they hold
//! spaces or operator characters). As in Asterisk, comparisons are numeric when both
//! sides are numbers and string comparisons otherwise; true is `1`, false is `0`, and
//! an empty string or `0` counts as false.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Val(String),
    Op(&'static str),
    Open,
    Close,
}

const OPS: &[&str] = &[
    "::", "==", "!=", "<=", ">=", "|", "&", "=", "<", ">", "+", "-", "*", "/", "%", "!", "?",
];

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<Tok>| {
        if !word.is_empty() {
            out.push(Tok::Val(std::mem::take(word)));
        }
    };
    while i < b.len() {
        let c = b[i];
        if c.is_whitespace() {
            flush(&mut word, &mut out);
            i += 1;
            continue;
        }
        if c == '"' {
            flush(&mut word, &mut out);
            let mut q = String::new();
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err("unterminated string".into()),
                    Some('"') => break,
                    Some('\\') if i + 1 < b.len() => {
                        q.push(b[i + 1]);
                        i += 2;
                        continue;
                    }
                    Some(&c) => q.push(c),
                }
                i += 1;
            }
            out.push(Tok::Val(q));
            i += 1;
            continue;
        }
        if c == '(' || c == ')' {
            flush(&mut word, &mut out);
            out.push(if c == '(' { Tok::Open } else { Tok::Close });
            i += 1;
            continue;
        }
        let rest: String = b[i..b.len().min(i + 2)].iter().collect();
        if let Some(op) = OPS.iter().find(|op| rest.starts_with(**op)) {
            // A ':' alone is Asterisk's regex operator, which we do not offer.
            flush(&mut word, &mut out);
            out.push(Tok::Op(op));
            i += op.len();
            continue;
        }
        if c == ':' {
            return Err("the ':' (regex) operator is not supported; use '::' in a ternary".into());
        }
        word.push(c);
        i += 1;
    }
    flush(&mut word, &mut out);
    Ok(out)
}

fn number(s: &str) -> Option<f64> {
    let t = s.trim();
    if t.is_empty() {
        return None;
    }
    t.parse::<f64>().ok().filter(|f| f.is_finite())
}

fn format_number(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        let s = format!("{f:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

pub(crate) fn truthy(s: &str) -> bool {
    match number(s) {
        Some(f) => f != 0.0,
        None => !s.is_empty(),
    }
}

fn bool_str(b: bool) -> String {
    if b { "1" } else { "0" }.to_string()
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek_op(&self) -> Option<&'static str> {
        match self.toks.get(self.pos) {
            Some(Tok::Op(o)) => Some(o),
            _ => None,
        }
    }

    fn eat(&mut self, op: &str) -> bool {
        if self.peek_op() == Some(op) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn ternary(&mut self) -> Result<String, String> {
        let cond = self.or()?;
        if self.eat("?") {
            let a = self.ternary()?;
            if !self.eat("::") {
                return Err("'?' without '::'".into());
            }
            let b = self.ternary()?;
            return Ok(if truthy(&cond) { a } else { b });
        }
        Ok(cond)
    }

    fn or(&mut self) -> Result<String, String> {
        let mut l = self.and()?;
        while self.eat("|") {
            let r = self.and()?;
            l = if truthy(&l) { l } else { r };
        }
        Ok(l)
    }

    fn and(&mut self) -> Result<String, String> {
        let mut l = self.cmp()?;
        while self.eat("&") {
            let r = self.cmp()?;
            l = if truthy(&l) && truthy(&r) {
                l
            } else {
                "0".into()
            };
        }
        Ok(l)
    }

    fn cmp(&mut self) -> Result<String, String> {
        let mut l = self.add()?;
        while let Some(op) = self
            .peek_op()
            .filter(|o| ["=", "==", "!=", "<", ">", "<=", ">="].contains(o))
        {
            self.pos += 1;
            let r = self.add()?;
            let ord = match (number(&l), number(&r)) {
                (Some(a), Some(b)) => a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal),
                _ => l.cmp(&r),
            };
            use std::cmp::Ordering::*;
            l = bool_str(match op {
                "=" | "==" => ord == Equal,
                "!=" => ord != Equal,
                "<" => ord == Less,
                ">" => ord == Greater,
                "<=" => ord != Greater,
                _ => ord != Less,
            });
        }
        Ok(l)
    }

    fn arith(l: &str, r: &str, op: &str) -> Result<String, String> {
        let (Some(a), Some(b)) = (number(l), number(r)) else {
            return Err(format!("non-numeric argument to '{op}': {l:?} {op} {r:?}"));
        };
        let v = match op {
            "+" => a + b,
            "-" => a - b,
            "*" => a * b,
            "/" | "%" if b == 0.0 => return Err("division by zero".into()),
            "/" if a.fract() == 0.0 && b.fract() == 0.0 => (a / b).trunc(),
            "/" => a / b,
            _ => a % b,
        };
        Ok(format_number(v))
    }

    fn add(&mut self) -> Result<String, String> {
        let mut l = self.mul()?;
        while let Some(op) = self.peek_op().filter(|o| *o == "+" || *o == "-") {
            self.pos += 1;
            let r = self.mul()?;
            l = Self::arith(&l, &r, op)?;
        }
        Ok(l)
    }

    fn mul(&mut self) -> Result<String, String> {
        let mut l = self.unary()?;
        while let Some(op) = self.peek_op().filter(|o| ["*", "/", "%"].contains(o)) {
            self.pos += 1;
            let r = self.unary()?;
            l = Self::arith(&l, &r, op)?;
        }
        Ok(l)
    }

    fn unary(&mut self) -> Result<String, String> {
        if self.eat("-") {
            let v = self.unary()?;
            return Self::arith("0", &v, "-");
        }
        if self.eat("!") {
            let v = self.unary()?;
            return Ok(bool_str(!truthy(&v)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<String, String> {
        match self.toks.get(self.pos).cloned() {
            Some(Tok::Val(v)) => {
                self.pos += 1;
                Ok(v)
            }
            Some(Tok::Open) => {
                self.pos += 1;
                let v = self.ternary()?;
                match self.toks.get(self.pos) {
                    Some(Tok::Close) => {
                        self.pos += 1;
                        Ok(v)
                    }
                    _ => Err("'(' without ')'".into()),
                }
            }
            Some(Tok::Close) => Err("')' without '('".into()),
            Some(Tok::Op(o)) => Err(format!("operator '{o}' where a value was expected")),
            None => Err("a value is missing at the end".into()),
        }
    }
}

/// Evaluates the inside of `$[...]` (variables already substituted).
pub fn evaluate(expr: &str) -> Result<String, String> {
    let toks = tokenize(expr)?;
    if toks.is_empty() {
        return Ok(String::new());
    }
    let mut p = Parser { toks, pos: 0 };
    let v = p.ternary()?;
    if p.pos != p.toks.len() {
        return Err(format!(
            "unexpected {:?} after the expression",
            p.toks[p.pos]
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::evaluate as e;

    #[test]
    fn arithmetic_and_precedence() {
        assert_eq!(e("1 + 2 * 3").unwrap(), "7");
        assert_eq!(e("(1 + 2) * 3").unwrap(), "9");
        assert_eq!(e("7 / 2").unwrap(), "3", "integer division as Asterisk");
        assert_eq!(e("7.5 / 2").unwrap(), "3.75");
        assert_eq!(e("7 % 3").unwrap(), "1");
        assert_eq!(e("5 - -3").unwrap(), "8");
        assert_eq!(e("10-4").unwrap(), "6", "operators need no spaces");
        assert!(e("1 / 0").is_err());
        assert!(e("abc + 1").is_err());
    }

    #[test]
    fn comparisons_numeric_or_string() {
        assert_eq!(e("10 > 9").unwrap(), "1", "numeric, not string, comparison");
        assert_eq!(e("abc < abd").unwrap(), "1");
        assert_eq!(e("1001 = 1001").unwrap(), "1");
        assert_eq!(e("1001 == 1002").unwrap(), "0");
        assert_eq!(e("\"BUSY\" = BUSY").unwrap(), "1");
        assert_eq!(e("01 = 1").unwrap(), "1");
        assert_eq!(e("NOANSWER != ANSWER").unwrap(), "1");
        assert_eq!(e("2 >= 2 & 3 <= 2").unwrap(), "0");
    }

    #[test]
    fn logic_and_ternary() {
        assert_eq!(e("0 | 5").unwrap(), "5");
        assert_eq!(e("x | 5").unwrap(), "x");
        assert_eq!(e("1 & 0").unwrap(), "0");
        assert_eq!(e("!0").unwrap(), "1");
        assert_eq!(e("!abc").unwrap(), "0");
        assert_eq!(e("1 = 1 ? yes :: no").unwrap(), "yes");
        assert_eq!(e("1 = 2 ? yes :: no").unwrap(), "no");
        assert_eq!(e("").unwrap(), "");
        assert_eq!(e("\"\" = \"\"").unwrap(), "1", "empty strings compare");
    }

    #[test]
    fn syntax_errors() {
        assert!(e("(1 + 2").is_err());
        assert!(e("1 +").is_err());
        assert!(e("1 2").is_err());
        assert!(e("1 ? 2").is_err());
        assert!(e("\"open").is_err());
        assert!(e("a : b").is_err());
    }
}
