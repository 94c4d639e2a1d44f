//! The filters of the listing queries (users, audit events), said once for
//! both SQL dialects: conditions with `{}` where a parameter goes, and the
//! values in order. Each store renders the placeholders its own way (`$n`,
//! `?n`) and binds the values in its own types (Postgres timestamps, SQLite
//! microseconds). One statement per filter combination rather than
//! `$1 IS NULL OR …`, which a cached generic plan cannot serve from an index.

use time::OffsetDateTime;

use super::{AuditQuery, UserQuery};
use crate::domain::AuditKind;

/// A value to bind, before the store converts it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Value<'a> {
    Text(&'a str),
    /// Compared at microsecond precision, rounded up (both stores keep
    /// microseconds, so a bound between two of them selects the same rows).
    Time(OffsetDateTime),
    Int(i64),
}

#[derive(Debug, Default)]
pub(crate) struct Filter<'a> {
    conditions: Vec<&'static str>,
    pub values: Vec<Value<'a>>,
}

impl<'a> Filter<'a> {
    /// `condition` holds one `{}` per value, in order.
    fn and(&mut self, condition: &'static str, values: &[Value<'a>]) {
        debug_assert_eq!(condition.matches("{}").count(), values.len());
        self.conditions.push(condition);
        self.values.extend_from_slice(values);
    }

    /// `WHERE …` with numbered placeholders (`placeholder(1)` first), or
    /// nothing; the next free number comes with it.
    pub fn render(&self, placeholder: fn(usize) -> String) -> (String, usize) {
        let mut next = 1;
        let rendered: Vec<String> = self
            .conditions
            .iter()
            .map(|c| {
                let mut parts = c.split("{}");
                let mut out = parts.next().unwrap_or_default().to_string();
                for part in parts {
                    out.push_str(&placeholder(next));
                    out.push_str(part);
                    next += 1;
                }
                out
            })
            .collect();
        let clause = if rendered.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", rendered.join(" AND "))
        };
        (clause, next)
    }
}

pub(crate) fn users(query: &UserQuery) -> Filter<'_> {
    let mut f = Filter::default();
    if let Some(provider) = &query.provider {
        f.and(
            "EXISTS (SELECT 1 FROM identities f WHERE f.user_id = users.id AND f.provider = {})",
            &[Value::Text(provider)],
        );
    }
    if let Some(after) = query.created_after {
        f.and("created_at >= {}", &[Value::Time(after)]);
    }
    if let Some(before) = query.created_before {
        f.and("created_at < {}", &[Value::Time(before)]);
    }
    if let Some((created_at, id)) = &query.after {
        f.and(
            "(created_at, id) < ({}, {})",
            &[Value::Time(*created_at), Value::Text(id)],
        );
    }
    f
}

pub(crate) fn audit_events(query: &AuditQuery) -> Filter<'_> {
    let mut f = Filter::default();
    if let Some(provider) = &query.provider {
        f.and("provider = {}", &[Value::Text(provider)]);
    }
    if let Some(user_id) = &query.user_id {
        f.and("user_id = {}", &[Value::Text(user_id)]);
    }
    if let Some(kind) = query.kind {
        f.and("kind = {}", &[Value::Text(AuditKind::as_str(kind))]);
    }
    if let Some(after) = query.after {
        f.and("at >= {}", &[Value::Time(after)]);
    }
    if let Some(before) = query.before {
        f.and("at < {}", &[Value::Time(before)]);
    }
    if let Some(before_id) = query.before_id {
        f.and("id < {}", &[Value::Int(before_id)]);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_in_either_dialect() {
        let q = AuditQuery {
            provider: Some("qq".into()),
            before_id: Some(7),
            ..Default::default()
        };
        let f = audit_events(&q);
        assert_eq!(
            f.render(|n| format!("${n}")),
            ("WHERE provider = $1 AND id < $2".to_string(), 3)
        );
        assert_eq!(
            f.render(|n| format!("?{n}")).0,
            "WHERE provider = ?1 AND id < ?2"
        );
        assert_eq!(f.values, [Value::Text("qq"), Value::Int(7)]);
        assert_eq!(
            audit_events(&AuditQuery::default()).render(|n| n.to_string()),
            (String::new(), 1)
        );
    }
}
