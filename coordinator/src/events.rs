//! Write events and explicit invalidations as clients send them, their
//! validation, and their resolution into one invalidation request (one seq).

use std::collections::BTreeMap;

use serde::Deserialize;

use shared::invalidation::Request;
use shared::names::{self, InvalidName};
use shared::protocol::Selector;

use crate::rules::RuleSet;

/// Most events in one batch.
pub const MAX_BATCH: usize = 1000;

/// An entity id: clients may send it as a string or a number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Id {
    /// `"42"`.
    Text(String),
    /// `42`.
    Number(serde_json::Number),
}

/// [`Id`]'s schema: a string or a number (or `null`: no id).
fn id_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
    Schema::OneOf(
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(ObjectBuilder::new().schema_type(Type::Number))
            .item(ObjectBuilder::new().schema_type(Type::Null))
            .description(Some("The entity's id, as a string or a number"))
            .build(),
    )
}

impl Id {
    fn as_string(&self) -> String {
        match self {
            Id::Text(s) => s.clone(),
            Id::Number(n) => n.to_string(),
        }
    }
}

/// One write event.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Tenant it happened in: 1 to 64 of `[A-Za-z0-9_-]`.
    #[schema(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    pub tenant: String,
    /// Entity type, such as `supplier`.
    pub entity: String,
    /// Entity id, if the event is about one entity.
    #[serde(default)]
    #[schema(schema_with = id_schema)]
    pub id: Option<Id>,
    /// What happened (`create`, `update`, `delete`, ...); recorded, not interpreted.
    #[serde(default)]
    pub op: Option<String>,
    /// Extra tags to invalidate.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Extra keys to invalidate.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Extra patterns to invalidate.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Idempotency id: a retry with the same id is answered, not redone.
    #[serde(default)]
    pub event_id: Option<String>,
    /// Allows a pattern covering the whole tenant.
    #[serde(default)]
    pub confirm: bool,
}

/// `POST /v1/invalidate`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvalidateBody {
    /// Tenant: 1 to 64 of `[A-Za-z0-9_-]`.
    #[schema(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    pub tenant: String,
    /// Exact keys.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Patterns.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Follow `depends_on` (default true).
    #[serde(default = "yes")]
    pub cascade: bool,
    /// Only report what would go.
    #[serde(default)]
    pub dry_run: bool,
    /// Allows a pattern covering the whole tenant.
    #[serde(default)]
    pub confirm: bool,
}

fn yes() -> bool {
    true
}

fn invalid(code: &'static str, message: String) -> InvalidName {
    InvalidName { code, message }
}

/// Checks the names in a selector; `confirm` allows a whole-tenant pattern.
pub fn validate_selector(s: &Selector, confirm: bool) -> Result<(), InvalidName> {
    names::validate_tenant(&s.tenant)?;
    for key in &s.keys {
        names::validate_key(key)?;
    }
    for tag in &s.tags {
        names::validate_tag(tag)?;
    }
    for pattern in &s.patterns {
        names::validate_pattern(pattern, confirm)?;
    }
    Ok(())
}

/// Parses a body holding one event or an array of events.
pub fn parse_events(body: &[u8]) -> Result<Vec<Event>, InvalidName> {
    // Each event is parsed once, straight into an `Event`; a batch is first
    // split into its raw items, so that an error names the event it is in.
    let not_json = |e: serde_json::Error| invalid("invalid_json", format!("the body is not JSON: {e}"));
    let events = if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body).map_err(not_json)?;
        items
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                serde_json::from_str(raw.get()).map_err(|e| invalid("invalid_event", format!("event {i}: {e}")))
            })
            .collect::<Result<Vec<Event>, _>>()?
    } else {
        match serde_json::from_slice::<Event>(body) {
            Ok(event) => vec![event],
            // Parsing streams: an event error can come before broken JSON.
            Err(e) if e.is_data() && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() => {
                return Err(invalid("invalid_event", format!("{e}")));
            }
            Err(e) => return Err(not_json(e)),
        }
    };
    if events.is_empty() {
        return Err(invalid("invalid_event", "the batch is empty; send at least one event".into()));
    }
    if events.len() > MAX_BATCH {
        return Err(invalid(
            "batch_too_large",
            format!("{} events in one batch; send at most {MAX_BATCH}", events.len()),
        ));
    }
    Ok(events)
}

/// Resolves events through the rules into one request: one selector per
/// tenant, everything validated before anything is touched.
pub fn resolve_events(events: &[Event], rules: &RuleSet, origin: String) -> Result<Request, InvalidName> {
    let mut by_tenant: BTreeMap<String, (Selector, bool)> = BTreeMap::new();
    let mut event_ids = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let at = |e: InvalidName| {
            if events.len() > 1 {
                invalid(e.code, format!("event {i}: {}", e.message))
            } else {
                e
            }
        };
        names::validate_tenant(&event.tenant).map_err(at)?;
        names::validate_tag(&event.entity)
            .map_err(|e| at(invalid("invalid_entity", format!("entity: {}", e.message))))?;
        let id = event.id.as_ref().map(Id::as_string);
        if let Some(id) = &id {
            if !valid_id(id) {
                return Err(at(invalid(
                    "invalid_id",
                    "id must be 1 to 256 characters without control characters".into(),
                )));
            }
        }
        if let Some(event_id) = &event.event_id {
            if event_id.is_empty() || event_id.len() > 256 || event_id.chars().any(char::is_control) {
                return Err(at(invalid(
                    "invalid_event_id",
                    "event_id must be 1 to 256 characters without control characters".into(),
                )));
            }
            event_ids.push((event.tenant.clone(), event_id.clone()));
        }
        let resolved = rules.resolve(&event.entity, id.as_deref());
        let (selector, confirm) = by_tenant.entry(event.tenant.clone()).or_insert_with(|| {
            (Selector { tenant: event.tenant.clone(), cascade: true, ..Selector::default() }, false)
        });
        *confirm |= event.confirm;
        extend_unique(&mut selector.tags, resolved.tags.into_iter().chain(event.tags.iter().cloned()));
        extend_unique(&mut selector.patterns, resolved.patterns.into_iter().chain(event.patterns.iter().cloned()));
        extend_unique(&mut selector.keys, event.keys.iter().cloned());
    }
    let mut items = Vec::with_capacity(by_tenant.len());
    for (_, (selector, confirm)) in by_tenant {
        validate_selector(&selector, confirm)?;
        items.push(selector);
    }
    // `ack` is set by `Coordinator::invalidate` from `wait`.
    Ok(Request { items, event_ids, origin, ack: false })
}

/// Whether `id` can be an event's id: 1 to 256 characters, none a control
/// character.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 256 && !id.chars().any(char::is_control)
}

fn extend_unique(list: &mut Vec<String>, items: impl Iterator<Item = String>) {
    for item in items {
        if !list.contains(&item) {
            list.push(item);
        }
    }
}

impl InvalidateBody {
    /// The selector, validated.
    pub fn selector(&self) -> Result<Selector, InvalidName> {
        let selector = Selector {
            tenant: self.tenant.clone(),
            keys: self.keys.clone(),
            tags: self.tags.clone(),
            patterns: self.patterns.clone(),
            cascade: self.cascade,
        };
        validate_selector(&selector, self.confirm)?;
        if selector.is_empty() {
            return Err(invalid("nothing_to_invalidate", "give at least one of keys, tags or patterns".into()));
        }
        Ok(selector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Rule;

    #[test]
    fn one_event_or_a_batch() {
        let one = parse_events(br#"{"tenant":"acme","entity":"supplier","id":42}"#).expect("one event");
        assert_eq!(one.len(), 1);
        let many =
            parse_events(br#"[{"tenant":"a","entity":"x"},{"tenant":"b","entity":"y","id":"7"}]"#).expect("batch");
        assert_eq!(many.len(), 2);
        assert_eq!(parse_events(b"[]").unwrap_err().code, "invalid_event");
        assert_eq!(parse_events(b"{").unwrap_err().code, "invalid_json");
        assert_eq!(parse_events(br#"{"tenant":"a"}"#).unwrap_err().code, "invalid_event");
        assert_eq!(parse_events(br#"{"tenant":"a","entity":"x","tag":["typo"]}"#).unwrap_err().code, "invalid_event");
    }

    #[test]
    fn events_group_by_tenant_and_numbers_are_ids() {
        let events = parse_events(
            br#"[{"tenant":"a","entity":"supplier","id":42,"keys":["k1"]},
                 {"tenant":"a","entity":"supplier","id":"42","tags":["extra"]},
                 {"tenant":"b","entity":"invoice","event_id":"e-1"}]"#,
        )
        .expect("parses");
        let req = resolve_events(&events, &RuleSet::default(), "test".into()).expect("resolves");
        assert_eq!(req.items.len(), 2);
        assert_eq!(req.items[0].tags, vec!["supplier", "supplier:42", "extra"]);
        assert_eq!(req.items[0].keys, vec!["k1"]);
        assert_eq!(req.items[1].tags, vec!["invoice"]);
        assert_eq!(req.event_ids, vec![("b".to_string(), "e-1".to_string())]);
    }

    #[test]
    fn bad_names_are_refused_before_anything_runs() {
        let rules = RuleSet::new(vec![Rule {
            entity: "supplier".into(),
            tags: vec!["supplier:{id}".into()],
            patterns: vec![],
            dependents: vec![],
        }])
        .expect("valid");
        let bad_id = parse_events(br#"{"tenant":"a","entity":"supplier","id":"4 2"}"#).expect("parses");
        assert_eq!(resolve_events(&bad_id, &rules, String::new()).unwrap_err().code, "invalid_tag");
        let star = parse_events(br#"{"tenant":"a","entity":"x","patterns":["*"]}"#).expect("parses");
        assert_eq!(resolve_events(&star, &rules, String::new()).unwrap_err().code, "confirm_required");
        let bad_tenant = parse_events(br#"{"tenant":"a b","entity":"x"}"#).expect("parses");
        assert_eq!(resolve_events(&bad_tenant, &rules, String::new()).unwrap_err().code, "invalid_tenant");
    }

    #[test]
    fn invalidate_needs_something_and_confirm_for_everything() {
        let body: InvalidateBody = serde_json::from_str(r#"{"tenant":"a"}"#).expect("parses");
        assert_eq!(body.selector().unwrap_err().code, "nothing_to_invalidate");
        let body: InvalidateBody = serde_json::from_str(r#"{"tenant":"a","patterns":["*"]}"#).expect("parses");
        assert_eq!(body.selector().unwrap_err().code, "confirm_required");
        let body: InvalidateBody =
            serde_json::from_str(r#"{"tenant":"a","patterns":["*"],"confirm":true}"#).expect("parses");
        assert!(body.selector().is_ok());
        assert!(body.cascade);
    }
}
