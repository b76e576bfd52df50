//! Purpose-bound projection: what of a log item a subscription receives. Every delivery path goes
//! through [`Subscription::project`], so a field outside the subscription's granted set cannot leave
//! the hub by any of them.

use std::collections::HashSet;

use serde_json::{Map, Value as Json};

use super::filter::{FieldValue, Filter};
use super::log::{Cursor, Item};
use super::record::{change_record, field};
use super::subscription::{Catalog, SubscriptionDef, ENVELOPE_FIELDS};

/// A subscription ready to project: its definition with the filter parsed.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The definition.
    pub def: SubscriptionDef,
    filter: Option<Filter>,
    follows: HashSet<String>,
    /// Per followed table, its citizen-id column.
    citizen_columns: Vec<(String, String)>,
    /// Whether it follows any table (so the log must decode row changes for it).
    pub follows_tables: bool,
}

/// A record leaving the hub: projected, with what the audit log needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Log position after this record (its resume token).
    pub cursor: Cursor,
    /// Stable id.
    pub event_id: String,
    /// Event name or table.
    pub name: String,
    /// Whose data it is.
    pub citizen_id: String,
    /// The projected record.
    pub body: Map<String, Json>,
    /// The granted fields it carries.
    pub fields: Vec<String>,
}

impl Subscription {
    /// Compiles a definition the catalog accepted.
    pub fn new(def: SubscriptionDef, catalog: &Catalog) -> Result<Self, Vec<String>> {
        let problems = catalog.check(&def);
        if !problems.is_empty() {
            return Err(problems);
        }
        let filter = def.filter.as_deref().map(Filter::parse).transpose().map_err(|e| vec![e.to_string()])?;
        let citizen_columns: Vec<(String, String)> = def
            .follow
            .iter()
            .filter_map(|f| catalog.tables.get(f).map(|t| (t.table.clone(), t.citizen_id.clone())))
            .collect();
        Ok(Self {
            follows: def.follow.iter().cloned().collect(),
            follows_tables: !citizen_columns.is_empty(),
            citizen_columns,
            filter,
            def,
        })
    }

    /// The record `item` becomes for this subscription, or `None` when it does not follow it or
    /// the filter rejects it.
    pub fn project(&self, cursor: Cursor, item: &Item) -> Option<Outgoing> {
        let (name, full, citizen_id) = match item {
            Item::Event(e) => {
                if !self.follows.contains(&e.event) {
                    return None;
                }
                (e.event.clone(), std::borrow::Cow::Borrowed(&e.payload), e.citizen_id.clone())
            }
            Item::Change { source_id, change, .. } => {
                let table = change.table.table.to_string();
                let column = &self.citizen_columns.iter().find(|(t, _)| *t == table)?.1;
                let record = change_record(source_id, change);
                let citizen = match record.get(column) {
                    Some(Json::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                (table, std::borrow::Cow::Owned(record), citizen)
            }
        };
        if let Some(f) = &self.filter {
            let get = |path: &str| match field(&full, path) {
                None | Some(Json::Null) => FieldValue::Null,
                Some(Json::String(s)) => FieldValue::Text(s),
                Some(Json::Number(n)) => n.as_f64().map_or(FieldValue::Null, FieldValue::Number),
                Some(Json::Bool(b)) => FieldValue::Bool(*b),
                Some(_) => FieldValue::Null,
            };
            if !f.matches(&get) {
                return None;
            }
        }
        let mut body = Map::new();
        for env in ENVELOPE_FIELDS {
            if let Some(v) = full.get(*env) {
                body.insert((*env).into(), v.clone());
            }
        }
        let mut fields = Vec::new();
        for path in self.def.fields.iter().filter(|f| !ENVELOPE_FIELDS.contains(&f.as_str())) {
            let Some(v) = field(&full, path) else { continue };
            insert_path(&mut body, path, v.clone());
            fields.push(path.clone());
        }
        let event_id = full.get("event_id").and_then(Json::as_str).unwrap_or_default().to_string();
        Some(Outgoing { cursor, event_id, name, citizen_id, body, fields })
    }
}

impl Subscription {
    /// The audit entry for delivering `event_id` of `citizen_id` with `fields` to this subscription.
    pub fn audit_entry(&self, citizen_id: &str, event_id: &str, fields: &[String]) -> crate::audit::Entry {
        crate::audit::Entry {
            subscription: self.def.id.clone(),
            subscriber: self.def.subscriber.clone(),
            purpose: self.def.purpose.clone(),
            channel: self.def.delivery.channel().into(),
            citizen_id: citizen_id.into(),
            event_id: event_id.into(),
            fields: fields.to_vec(),
        }
    }
}

fn insert_path(map: &mut Map<String, Json>, path: &str, v: Json) {
    match path.split_once('.') {
        None => {
            map.insert(path.into(), v);
        }
        Some((head, rest)) => {
            let inner = map.entry(head.to_string()).or_insert_with(|| Json::Object(Map::new()));
            if let Json::Object(m) = inner {
                insert_path(m, rest, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::record::DomainEvent;
    use crate::fanout::subscription::{tests::catalog, Delivery};

    #[test]
    fn only_granted_fields_leave_and_the_filter_reads_the_full_record() {
        let def = SubscriptionDef {
            id: "s".into(),
            subscriber: "bhxh".into(),
            purpose: "social-insurance".into(),
            follow: vec!["residence.changed".into()],
            filter: Some("province_code = '79'".into()),
            fields: vec!["citizen_id".into(), "current.commune_code".into()],
            delivery: Delivery::Grpc,
            start: "now".into(),
        };
        let sub = Subscription::new(def, &catalog()).unwrap();
        let payload = serde_json::json!({
            "event_id": "hcm:7:residence.changed", "event": "residence.changed", "citizen_id": "079090001234",
            "source_id": "hcm", "effective_at": "2026-11-22T01:02:03.000000Z", "province_code": "79",
            "residence_kind": "permanent",
            "previous": {"commune_code": "26734", "address": "12 Lê Lợi"},
            "current": {"commune_code": "26737", "address": "5 Hai Bà Trưng"}
        });
        let mut e = DomainEvent {
            event_id: "hcm:7:residence.changed".into(),
            event: "residence.changed".into(),
            source_id: "hcm".into(),
            seq: 7,
            citizen_id: "079090001234".into(),
            effective_at_us: 0,
            payload: payload.as_object().unwrap().clone(),
        };
        let out = sub.project(Cursor { chunk: 3, item: 1 }, &Item::Event(std::sync::Arc::new(e.clone()))).unwrap();
        assert_eq!(
            Json::Object(out.body),
            serde_json::json!({"event_id": "hcm:7:residence.changed", "event": "residence.changed",
                               "citizen_id": "079090001234", "current": {"commune_code": "26737"}})
        );
        assert_eq!(out.fields, vec!["citizen_id", "current.commune_code"]);
        e.payload.insert("province_code".into(), Json::String("01".into()));
        assert_eq!(sub.project(Cursor::default(), &Item::Event(std::sync::Arc::new(e.clone()))), None, "filtered out");
        e.event = "citizen.died".into();
        assert_eq!(sub.project(Cursor::default(), &Item::Event(std::sync::Arc::new(e))), None, "not followed");
    }
}
