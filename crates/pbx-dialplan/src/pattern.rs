//! Extension patterns (`_NXXXXXX`, `_[1-5]X.`, `_9!`) and Asterisk's ordering of them.
//!
//! Asterisk tries a context's extensions from the most specific to the least: an exact
//! name before any pattern, and between patterns, position by position, the element
//! matching fewer characters first (`1` < `N` < `Z` < `X` < `.` < `!`); on equal size the
//! class with the lower first character wins, so the order is total and predictable.

use std::cmp::Ordering;

/// One element of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Elem {
    /// Exactly these characters (a literal is a one-character set).
    Set(Vec<char>),
    /// `.`: one or more of anything.
    OneOrMore,
    /// `!`: zero or more of anything (also matches early while dialling).
    ZeroOrMore,
}

impl Elem {
    fn matches(&self, c: char) -> bool {
        match self {
            Elem::Set(set) => set.contains(&c),
            Elem::OneOrMore | Elem::ZeroOrMore => true,
        }
    }

    /// (how many characters it matches, lowest one): smaller is more specific.
    fn weight(&self) -> (usize, char) {
        match self {
            Elem::Set(set) => (set.len(), set.iter().copied().min().unwrap_or('\0')),
            Elem::OneOrMore => (usize::MAX - 1, '\0'),
            Elem::ZeroOrMore => (usize::MAX, '\0'),
        }
    }
}

/// An extension name or pattern as written in the dialplan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// As written (`_NXX.`, `100`, `s`).
    pub text: String,
    elems: Vec<Elem>,
    is_pattern: bool,
}

fn digits(from: char, to: char) -> Vec<char> {
    (from..=to).collect()
}

impl Pattern {
    /// Parses an extension. Dashes in it are ignored, as Asterisk does (`555-1212`).
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty extension".into());
        }
        let Some(body) = text.strip_prefix('_') else {
            let elems = text
                .chars()
                .filter(|&c| c != '-')
                .map(|c| Elem::Set(vec![c]))
                .collect::<Vec<_>>();
            if elems.is_empty() {
                return Err(format!("extension {text:?} has no characters"));
            }
            return Ok(Pattern {
                text: text.to_string(),
                elems,
                is_pattern: false,
            });
        };
        let mut elems = Vec::new();
        let mut chars = body.chars().peekable();
        while let Some(c) = chars.next() {
            let elem = match c {
                'X' | 'x' => Elem::Set(digits('0', '9')),
                'Z' | 'z' => Elem::Set(digits('1', '9')),
                'N' | 'n' => Elem::Set(digits('2', '9')),
                '.' => Elem::OneOrMore,
                '!' => Elem::ZeroOrMore,
                '-' => continue,
                '[' => {
                    let mut set = Vec::new();
                    let mut closed = false;
                    let mut prev: Option<char> = None;
                    while let Some(c) = chars.next() {
                        match c {
                            ']' => {
                                closed = true;
                                break;
                            }
                            '-' if prev.is_some() && chars.peek().is_some_and(|&n| n != ']') => {
                                let from = prev.take().unwrap_or('\0');
                                let to = chars.next().unwrap_or(from);
                                if to < from {
                                    return Err(format!(
                                        "pattern {text:?}: range {from}-{to} is backwards"
                                    ));
                                }
                                set.extend(from..=to);
                            }
                            c => {
                                set.push(c);
                                prev = Some(c);
                            }
                        }
                    }
                    if !closed {
                        return Err(format!("pattern {text:?}: '[' without ']'"));
                    }
                    set.sort_unstable();
                    set.dedup();
                    if set.is_empty() {
                        return Err(format!("pattern {text:?}: empty character class"));
                    }
                    Elem::Set(set)
                }
                ']' => return Err(format!("pattern {text:?}: ']' without '['")),
                c => Elem::Set(vec![c]),
            };
            let wildcard = matches!(elem, Elem::OneOrMore | Elem::ZeroOrMore);
            elems.push(elem);
            if wildcard && chars.peek().is_some() {
                return Err(format!(
                    "pattern {text:?}: '.' and '!' match the rest, so they must come last"
                ));
            }
        }
        if elems.is_empty() {
            return Err(format!("pattern {text:?} is empty after '_'"));
        }
        Ok(Pattern {
            text: text.to_string(),
            elems,
            is_pattern: true,
        })
    }

    pub fn is_pattern(&self) -> bool {
        self.is_pattern
    }

    /// Whether `exten` (a dialled number or name) matches.
    pub fn matches(&self, exten: &str) -> bool {
        let exten: Vec<char> = if self.is_pattern {
            exten.chars().collect()
        } else {
            exten.chars().filter(|&c| c != '-').collect()
        };
        let mut i = 0;
        for e in &self.elems {
            match e {
                Elem::OneOrMore => return exten.len() > i,
                Elem::ZeroOrMore => return true,
                Elem::Set(_) => {
                    if i >= exten.len() || !e.matches(exten[i]) {
                        return false;
                    }
                    i += 1;
                }
            }
        }
        i == exten.len()
    }

    /// Whether a longer string starting with `prefix` could match (Asterisk's
    /// "matchmore": while it is true, digit collection waits for another digit). `!`
    /// asks for an early match, so it never waits.
    pub fn can_match_more(&self, prefix: &str) -> bool {
        let prefix: Vec<char> = prefix.chars().filter(|&c| c != '-').collect();
        let mut i = 0;
        for e in &self.elems {
            match e {
                Elem::OneOrMore => return true,
                Elem::ZeroOrMore => return false,
                Elem::Set(_) => {
                    if i >= prefix.len() {
                        return true;
                    }
                    if !e.matches(prefix[i]) {
                        return false;
                    }
                    i += 1;
                }
            }
        }
        false
    }

    /// Asterisk's order: the more specific extension first (see the module docs).
    pub fn specificity_cmp(&self, other: &Pattern) -> Ordering {
        match (self.is_pattern, other.is_pattern) {
            (false, true) => return Ordering::Less,
            (true, false) => return Ordering::Greater,
            (false, false) => return self.text.cmp(&other.text),
            (true, true) => {}
        }
        for (a, b) in self.elems.iter().zip(&other.elems) {
            match a.weight().cmp(&b.weight()) {
                Ordering::Equal => {}
                o => return o,
            }
        }
        // One is a prefix of the other: the longer one is more specific.
        other
            .elems
            .len()
            .cmp(&self.elems.len())
            .then_with(|| self.text.cmp(&other.text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn longer_strings_that_could_still_match() {
        assert!(p("123").can_match_more("12"));
        assert!(p("123").can_match_more(""));
        assert!(!p("123").can_match_more("123"));
        assert!(!p("123").can_match_more("13"));
        assert!(p("_1X.").can_match_more("1"));
        assert!(p("_1X.").can_match_more("123"));
        assert!(!p("_1X.").can_match_more("2"));
        assert!(!p("_9!").can_match_more("9"));
        assert!(!p("_NXX").can_match_more("234"));
    }

    #[test]
    fn asterisk_pattern_characters() {
        assert!(p("_X").matches("0"));
        assert!(!p("_Z").matches("0"));
        assert!(p("_Z").matches("1"));
        assert!(!p("_N").matches("1"));
        assert!(p("_N").matches("2"));
        assert!(p("_[1-5]X").matches("39"));
        assert!(!p("_[1-5]X").matches("69"));
        assert!(p("_[a-c7]").matches("b"));
        assert!(p("_9.").matches("912"));
        assert!(!p("_9.").matches("9"), ". needs at least one character");
        assert!(p("_9!").matches("9"), "! matches zero or more");
        assert!(p("_NXXNXXXXXX").matches("2125551212"));
        assert!(!p("_NXXNXXXXXX").matches("212555121"));
        assert!(p("555-1212").matches("5551212"), "dashes are ignored");
        assert!(p("alice").matches("alice"));
        assert!(!p("alice").matches("alicex"));
        assert!(p("_x").matches("5"), "pattern letters are case-insensitive");
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(Pattern::parse("_[12").is_err());
        assert!(Pattern::parse("_1]").is_err());
        assert!(Pattern::parse("_[]").is_err());
        assert!(Pattern::parse("_[9-1]").is_err());
        assert!(Pattern::parse("_9.1").is_err());
        assert!(Pattern::parse("_").is_err());
        assert!(Pattern::parse("").is_err());
    }

    /// The order Asterisk documents: exact first, then by position the element with the
    /// fewest matches (literal < N < Z < X < . < !).
    #[test]
    fn most_specific_first() {
        let mut v = vec![
            p("_X."),
            p("_!"),
            p("_NXX"),
            p("_1XX"),
            p("123"),
            p("_ZXX"),
            p("_XXX"),
            p("_12X"),
            p("_[1-3]XX"),
        ];
        v.sort_by(|a, b| a.specificity_cmp(b));
        let order: Vec<&str> = v.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(
            order,
            ["123", "_12X", "_1XX", "_[1-3]XX", "_NXX", "_ZXX", "_XXX", "_X.", "_!"]
        );
    }
}
