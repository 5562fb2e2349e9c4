//! The users CSV, read the same way by the node's users file and by `pbxctl user import`:
//! `user,password[,context[,caller_id_name]]` lines, fields trimmed, `#` comments and
//! blank lines skipped, a `user,password…` header on line 1 skipped. Every bad line is
//! reported, so a file is fixed in one round.

use std::collections::HashSet;

use crate::{validate_context, validate_user_name, StateError};

/// One user of the file. Empty optional columns are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub name: String,
    pub password: String,
    pub context: Option<String>,
    pub caller_id_name: Option<String>,
}

/// What is wrong with one line (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// The users of `text`, or [`StateError::UsersCsv`] listing every bad line.
pub fn parse(text: &str) -> Result<Vec<UserRow>, StateError> {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        match parse_line(line, raw.trim()) {
            Ok(None) => {}
            Ok(Some(row)) if !seen.insert(row.name.clone()) => errors.push(LineError {
                line,
                reason: format!("user '{}' is listed twice", row.name),
            }),
            Ok(Some(row)) => rows.push(row),
            Err(reason) => errors.push(LineError { line, reason }),
        }
    }
    if errors.is_empty() {
        Ok(rows)
    } else {
        Err(StateError::UsersCsv(errors))
    }
}

fn parse_line(line: usize, text: &str) -> Result<Option<UserRow>, String> {
    if text.is_empty() || text.starts_with('#') {
        return Ok(None);
    }
    let f: Vec<&str> = text.split(',').map(str::trim).collect();
    if !(2..=4).contains(&f.len()) {
        return Err("expected user,password[,context[,caller_id_name]]".into());
    }
    if line == 1 && f[0].eq_ignore_ascii_case("user") && f[1].eq_ignore_ascii_case("password") {
        return Ok(None);
    }
    validate_user_name(f[0]).map_err(|e| e.to_string())?;
    if f[1].is_empty() {
        return Err(format!("user '{}' has an empty password", f[0]));
    }
    let optional = |i: usize| f.get(i).filter(|s| !s.is_empty()).map(|s| s.to_string());
    let context = optional(2);
    if let Some(c) = &context {
        validate_context(c).map_err(|e| e.to_string())?;
    }
    Ok(Some(UserRow {
        name: f[0].to_string(),
        password: f[1].to_string(),
        context,
        caller_id_name: optional(3),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<usize> {
        match parse(text) {
            Err(StateError::UsersCsv(e)) => e.iter().map(|e| e.line).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rows_with_optional_columns() {
        let rows = parse("User,Password,context\n# demo\nalice,secret\n\n1001 , pw\nbob,pw2,sales,Bob B\ncarol,pw3,,Carol\n").unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[1].name, "1001");
        assert_eq!(rows[1].password, "pw");
        assert_eq!(
            rows[2],
            UserRow {
                name: "bob".into(),
                password: "pw2".into(),
                context: Some("sales".into()),
                caller_id_name: Some("Bob B".into()),
            }
        );
        assert_eq!(
            (rows[3].context.clone(), rows[3].caller_id_name.clone()),
            (None, Some("Carol".into()))
        );
        assert_eq!(parse("bang!,pw\n").unwrap()[0].name, "bang!");
    }

    #[test]
    fn every_bad_line_is_reported() {
        assert_eq!(lines("alice,x\nbob\n,x\ncarol,pw\n"), vec![2, 3]);
        assert_eq!(lines("alice,x\nalice,y\n"), vec![2]);
        assert_eq!(lines("al ice,x\n"), vec![1]);
        assert_eq!(lines("alice,\n"), vec![1]);
        assert_eq!(lines("alice,x,sal es\n"), vec![1]);
        assert_eq!(lines("alice,x,a,b,c\n"), vec![1]);
        // A header only on line 1: later, `user` is a user.
        assert_eq!(parse("alice,x\nuser,password\n").unwrap().len(), 2);
        let e = parse("alice,x\nbob\n").unwrap_err().to_string();
        assert!(e.contains("line 2: expected user,password"), "{e}");
    }
}
