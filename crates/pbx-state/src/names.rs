//! The rules for user and context names, applied by every way in (the users file, the
//! admin API, `pbxctl`) so that a name one of them accepts the others accept too.

use crate::StateError;

/// Longest user name accepted, in bytes.
pub const MAX_USER_NAME: usize = 64;

/// A user name is the user part of the user's SIP URI, so it follows RFC 3261's `user`
/// production: 1*( unreserved / escaped / user-unreserved ), where unreserved is
/// letters, digits and `-_.!~*'()`, escaped is `%` and two hex digits, and
/// user-unreserved is `&=+$,;?/`. At most [`MAX_USER_NAME`] bytes.
pub fn validate_user_name(name: &str) -> Result<(), StateError> {
    let bad = |why: String| {
        Err(StateError::UserName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty".into());
    }
    if name.len() > MAX_USER_NAME {
        return bad(format!("longer than {MAX_USER_NAME} bytes"));
    }
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            if !bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
            {
                return bad("'%' must be followed by two hex digits".into());
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-_.!~*'()&=+$,;?/".contains(&b)) {
            let c = name[i..].chars().next().unwrap_or('?');
            return bad(format!(
                "{c:?} is not allowed (letters, digits, -_.!~*'()&=+$,;?/ and %HH escapes)"
            ));
        }
        i += 1;
    }
    Ok(())
}

/// A dialplan context name as a user's context: not empty, no whitespace and no `]`
/// (which would end a `[context]` header).
pub fn validate_context(context: &str) -> Result<(), StateError> {
    if context.is_empty() || context.contains(|c: char| c.is_whitespace() || c == ']') {
        return Err(StateError::Context(context.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_follow_the_sip_user_part() {
        for ok in [
            "alice",
            "1001",
            "+4930123",
            "a.b_c-d",
            "bang!",
            "o'brien",
            "x~*()",
            "a&b=c$d,e;f?g/h",
            "caf%C3%A9",
            &"a".repeat(MAX_USER_NAME),
        ] {
            assert!(validate_user_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "al ice",
            "a@b",
            "a:b",
            "a\"b",
            "a<b",
            "a#b",
            "é",
            "50%",
            "%zz",
            "%4",
            &"a".repeat(MAX_USER_NAME + 1),
        ] {
            assert!(validate_user_name(bad).is_err(), "{bad}");
        }
        let e = validate_user_name("a@b").unwrap_err().to_string();
        assert!(e.contains("\"a@b\"") && e.contains("'@'"), "{e}");
    }

    #[test]
    fn contexts_have_no_space_or_bracket() {
        assert!(validate_context("default").is_ok());
        assert!(validate_context("sales-1").is_ok());
        for bad in ["", "a b", "a]", "\t"] {
            assert!(validate_context(bad).is_err(), "{bad:?}");
        }
    }
}
