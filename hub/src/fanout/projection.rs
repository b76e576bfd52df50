//! Purpose-bound projection: what of a log item a subscription receives. Every delivery path goes
//! through [`Subscription::project`], so a field outside the subscription's granted set cannot leave
//! the hub by any of them.
//!
//! Grants are per followed item: a subscription following a table and an event receives, on each
//! record, the fields it asked for *that its purpose allows for that item* — a field granted for
//! the event is not delivered on the table's records. The filter reads per item too, what the
//! purpose allows for that item: any other field reads as NULL, so a filter cannot learn a value
//! the purpose does not grant there either.
//! The envelope comes from the log item, never from the row ([`super::record`]).

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value as Json};

use super::filter::{FieldValue, Filter};
use super::log::{Cursor, Item};
use super::record::{change_data, field, op_name};
use super::subscription::{Catalog, SubscriptionDef, ENVELOPE_FIELDS};

/// A subscription ready to project: its definition with the filter parsed.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The definition.
    pub def: SubscriptionDef,
    filter: Option<Filter>,
    follows: HashSet<String>,
    /// Per followed item, the requested fields its purpose allows for it (delivered).
    grants: HashMap<String, Vec<String>>,
    /// Per followed item, every field its purpose allows for it (what the filter may read).
    allowed: HashMap<String, Vec<String>>,
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
    /// When the change behind it was committed at the source (Unix microseconds): its lag.
    pub committed_at_us: i64,
}

impl Subscription {
    /// Compiles a definition the catalog accepted.
    pub fn new(def: SubscriptionDef, catalog: &Catalog) -> Result<Self, Vec<String>> {
        let problems = catalog.check(&def);
        if !problems.is_empty() {
            return Err(problems);
        }
        let filter = def.filter.as_deref().map(Filter::parse).transpose().map_err(|e| vec![e.to_string()])?;
        let purpose = catalog.purposes.get(&def.purpose).ok_or_else(|| vec![format!("no purpose {}", def.purpose)])?;
        let grants = def
            .follow
            .iter()
            .map(|item| {
                let allowed = purpose.allows.get(item).map(Vec::as_slice).unwrap_or_default();
                let fields = def
                    .fields
                    .iter()
                    .filter(|f| !ENVELOPE_FIELDS.contains(&f.as_str()) && allowed.contains(f))
                    .cloned()
                    .collect();
                (item.clone(), fields)
            })
            .collect();
        let allowed = def
            .follow
            .iter()
            .map(|item| (item.clone(), purpose.allows.get(item).cloned().unwrap_or_default()))
            .collect();
        let citizen_columns: Vec<(String, String)> = def
            .follow
            .iter()
            .filter_map(|f| catalog.tables.get(f).map(|t| (t.table.clone(), t.citizen_id.clone())))
            .collect();
        Ok(Self {
            follows: def.follow.iter().cloned().collect(),
            grants,
            allowed,
            follows_tables: !citizen_columns.is_empty(),
            citizen_columns,
            filter,
            def,
        })
    }

    /// The record `item` becomes for this subscription, or `None` when it does not follow it or
    /// the filter rejects it.
    pub fn project(&self, cursor: Cursor, item: &Item) -> Option<Outgoing> {
        // The envelope is built from the item itself; data are the row or payload.
        let committed_at_us = match item {
            Item::Event(e) => e.effective_at_us,
            Item::Change { change, .. } => change.commit_time_us,
        };
        let (name, data, citizen_id, envelope) = match item {
            Item::Event(e) => {
                if !self.follows.contains(&e.event) {
                    return None;
                }
                let envelope =
                    vec![("event_id", Json::String(e.event_id.clone())), ("event", Json::String(e.event.clone()))];
                (e.event.clone(), std::borrow::Cow::Borrowed(&e.payload), e.citizen_id.clone(), envelope)
            }
            Item::Change { source_id, change, part, .. } => {
                let table = change.table.table.to_string();
                let column = &self.citizen_columns.iter().find(|(t, _)| *t == table)?.1;
                let data = change_data(change);
                let citizen = match data.get(column) {
                    Some(Json::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                let envelope = vec![
                    // The deletes one national truncate is read as share its seq.
                    (
                        "event_id",
                        Json::String(match part {
                            Some(n) => format!("{source_id}:{}.{n}", change.seq),
                            None => format!("{source_id}:{}", change.seq),
                        }),
                    ),
                    ("table", Json::String(table.clone())),
                    ("op", Json::String(op_name(change.op).into())),
                ];
                (table, std::borrow::Cow::Owned(data), citizen, envelope)
            }
        };
        let granted = self.grants.get(&name).map(Vec::as_slice).unwrap_or_default();
        if let Some(f) = &self.filter {
            let readable = self.allowed.get(&name).map(Vec::as_slice).unwrap_or_default();
            let get = |path: &str| {
                if !readable.iter().any(|g| g == path) {
                    return FieldValue::Null;
                }
                match field(&data, path) {
                    None | Some(Json::Null) => FieldValue::Null,
                    Some(Json::String(s)) => FieldValue::Text(s),
                    Some(Json::Number(n)) => n.as_f64().map_or(FieldValue::Null, FieldValue::Number),
                    Some(Json::Bool(b)) => FieldValue::Bool(*b),
                    Some(_) => FieldValue::Null,
                }
            };
            if !f.matches(&get) {
                return None;
            }
        }
        let mut body = Map::new();
        let mut fields = Vec::new();
        for path in granted {
            let Some(v) = field(&data, path) else { continue };
            insert_path(&mut body, path, v.clone());
            fields.push(path.clone());
        }
        let event_id = envelope[0].1.as_str().unwrap_or_default().to_string();
        for (k, v) in envelope {
            body.insert(k.into(), v);
        }
        Some(Outgoing { cursor, event_id, name, citizen_id, body, fields, committed_at_us })
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
            "event_id": "forged", "event": "forged", "citizen_id": "079090001234",
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

    #[test]
    fn a_table_and_event_subscription_gets_per_item_fields_and_row_columns_cannot_forge_the_envelope() {
        use dongbo_connectors::model::{ChangeEvent, Column, Operation, TableId, TableSchema, Value};
        let def = SubscriptionDef {
            id: "m".into(),
            subscriber: "bhxh".into(),
            purpose: "registry".into(),
            follow: vec!["public.citizens".into(), "residence.changed".into()],
            filter: None,
            fields: vec![
                "citizen_id".into(),
                "commune_code".into(),
                "current.commune_code".into(),
                "province_code".into(),
            ],
            delivery: Delivery::Grpc,
            start: "now".into(),
        };
        let sub = Subscription::new(def.clone(), &catalog()).unwrap();
        let col = |n: &str| Column { name: n.into(), type_name: "text".into(), type_oid: 25 };
        let names = ["citizen_id", "commune_code", "province_code", "event", "op", "event_id", "table"];
        let schema = std::sync::Arc::new(TableSchema::new(
            TableId::new("public", "citizens"),
            names.iter().map(|n| col(n)).collect(),
            vec![0],
        ));
        let text = |s: &str| Value::Text(s.into());
        let row = vec![
            text("079090001234"),
            text("26734"),
            text("79"),
            text("forged.event"),
            text("forged-op"),
            text("forged-id"),
            text("forged.table"),
        ];
        let change = ChangeEvent::for_test(42, &schema, Operation::Update, vec![text("079090001234")], Some(row));
        let item = Item::Change { source_id: "hcm".into(), change, part: None, logged_at_us: 0 };
        let out = sub.project(Cursor::default(), &item).expect("followed");
        assert_eq!(
            Json::Object(out.body.clone()),
            serde_json::json!({"event_id": "hcm:42", "table": "public.citizens", "op": "update",
                               "citizen_id": "079090001234", "commune_code": "26734"}),
            "province_code is granted for the event only; row columns named like the envelope neither leak nor overwrite"
        );
        assert_eq!(out.fields, vec!["citizen_id", "commune_code"]);
        assert_eq!(out.event_id, "hcm:42");

        // The filter reads per item too: province_code is not readable on the table's records.
        let filtered =
            Subscription::new(SubscriptionDef { filter: Some("province_code = '79'".into()), ..def }, &catalog())
                .unwrap();
        assert_eq!(filtered.project(Cursor::default(), &item), None);
        let e = DomainEvent {
            event_id: "hcm:42:residence.changed".into(),
            event: "residence.changed".into(),
            source_id: "hcm".into(),
            seq: 42,
            citizen_id: "079090001234".into(),
            effective_at_us: 0,
            payload: serde_json::json!({"citizen_id": "079090001234", "province_code": "79",
                                        "current": {"commune_code": "26737"}, "commune_code": "leak"})
            .as_object()
            .unwrap()
            .clone(),
        };
        let out = filtered.project(Cursor::default(), &Item::Event(std::sync::Arc::new(e))).expect("passes the filter");
        assert_eq!(
            Json::Object(out.body),
            serde_json::json!({"event_id": "hcm:42:residence.changed", "event": "residence.changed",
                               "citizen_id": "079090001234", "province_code": "79", "current": {"commune_code": "26737"}}),
            "commune_code is granted for the table only"
        );
    }
}
