//! One committed transaction's row changes, gathered between `BEGIN` and
//! `COMMIT` and turned into one invalidation request.
//!
//! Memory is bounded whatever the transaction's size: past
//! `max_rows_per_transaction` distinct rows, the rows gathered so far give way
//! to their entities as a whole in each tenant (each `(tenant, entity)` is then
//! one entry), and past as many `(tenant, entity)` pairs, to their entities in
//! every tenant. Widening invalidates more, never less.

use std::collections::{BTreeMap, BTreeSet};

use shared::invalidation::Request;
use shared::names;
use shared::protocol::Selector;

use crate::rules::{Resolved, RuleSet};

/// The rows of one entity in one tenant that a transaction changed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rows {
    /// These ids.
    Ids(BTreeSet<String>),
    /// Every row: a `TRUNCATE`, or more rows than the bound.
    All,
}

/// A transaction being gathered.
#[derive(Debug)]
pub struct Txn {
    /// Rows by `(tenant, entity)`.
    rows: BTreeMap<(String, String), Rows>,
    /// Entities changed as a whole in every tenant.
    everywhere: BTreeSet<String>,
    /// Distinct ids held in `rows`.
    ids: usize,
    /// The bound on `ids` and on `rows.len()`.
    max_rows: usize,
    /// Row changes read (counted by the reader: an update's old and new
    /// row are one change).
    pub changes: u64,
}

impl Txn {
    /// An empty transaction that keeps at most `max_rows` rows.
    pub fn new(max_rows: usize) -> Txn {
        Txn { rows: BTreeMap::new(), everywhere: BTreeSet::new(), ids: 0, max_rows: max_rows.max(1), changes: 0 }
    }

    /// Whether the transaction changed nothing the sources follow.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.everywhere.is_empty()
    }

    /// Row `id` of `entity` in `tenant` changed; no id: the row's id is
    /// unknown, so the entity goes as a whole in that tenant.
    pub fn row(&mut self, tenant: &str, entity: &str, id: Option<&str>) {
        if self.everywhere.contains(entity) {
            return;
        }
        let pair = (tenant.to_string(), entity.to_string());
        let rows = self.rows.entry(pair).or_insert_with(|| Rows::Ids(BTreeSet::new()));
        match (rows, id) {
            (Rows::All, _) => {}
            (Rows::Ids(ids), Some(id)) => {
                if ids.insert(id.to_string()) {
                    self.ids += 1;
                }
            }
            (rows @ Rows::Ids(_), None) => {
                if let Rows::Ids(ids) = rows {
                    self.ids -= ids.len();
                }
                *rows = Rows::All;
            }
        }
        self.bound();
    }

    /// Every row of `entity` in `tenant` changed.
    pub fn all_rows(&mut self, tenant: &str, entity: &str) {
        self.row(tenant, entity, None);
    }

    /// Every row of `entity` in every tenant changed.
    pub fn everywhere(&mut self, entity: &str) {
        self.everywhere.insert(entity.to_string());
        let before = self.rows.len();
        self.rows.retain(|(_, e), _| e != entity);
        if self.rows.len() != before {
            self.recount();
        }
    }

    /// The entities changed in every tenant.
    pub fn everywhere_entities(&self) -> impl Iterator<Item = &str> {
        self.everywhere.iter().map(String::as_str)
    }

    /// Keeps the gathered rows within the bound.
    fn bound(&mut self) {
        if self.ids > self.max_rows {
            for rows in self.rows.values_mut() {
                *rows = Rows::All;
            }
            self.ids = 0;
        }
        if self.rows.len() > self.max_rows {
            let entities: BTreeSet<String> = self.rows.keys().map(|(_, e)| e.clone()).collect();
            self.rows.clear();
            self.ids = 0;
            self.everywhere.extend(entities);
        }
    }

    fn recount(&mut self) {
        self.ids = self.rows.values().map(|r| if let Rows::Ids(ids) = r { ids.len() } else { 0 }).sum();
    }

    /// The invalidation: one selector per tenant, each carrying the
    /// transaction's `event_id`. `tenants` are the tenants an entity changed
    /// everywhere is invalidated in.
    pub fn request(&self, rules: &RuleSet, tenants: &BTreeSet<String>, event_id: &str, origin: String) -> Request {
        let mut by_tenant: BTreeMap<String, Selector> = BTreeMap::new();
        let mut add = |tenant: &str, resolved: Resolved| {
            let selector = by_tenant.entry(tenant.to_string()).or_insert_with(|| Selector {
                tenant: tenant.to_string(),
                cascade: true,
                ..Selector::default()
            });
            extend_unique(&mut selector.tags, resolved.tags);
            extend_unique(&mut selector.patterns, resolved.patterns);
        };
        for ((tenant, entity), rows) in &self.rows {
            match rows {
                Rows::All => add(tenant, rules.resolve_collection(entity)),
                Rows::Ids(ids) => {
                    for id in ids {
                        let resolved = rules.resolve(entity, Some(id));
                        // An id that makes no valid name cannot be in one:
                        // its entity goes as a whole instead.
                        if resolved.tags.iter().all(|t| names::validate_tag(t).is_ok()) {
                            add(tenant, resolved);
                        } else {
                            add(tenant, rules.resolve_collection(entity));
                        }
                    }
                }
            }
        }
        for entity in &self.everywhere {
            let resolved = rules.resolve_collection(entity);
            for tenant in tenants {
                add(tenant, resolved.clone());
            }
        }
        let event_ids = by_tenant.keys().map(|t| (t.clone(), event_id.to_string())).collect();
        Request { items: by_tenant.into_values().collect(), event_ids, origin, ack: false }
    }
}

fn extend_unique(list: &mut Vec<String>, items: Vec<String>) {
    for item in items {
        if !list.contains(&item) {
            list.push(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Rule;

    fn rules() -> RuleSet {
        RuleSet::new(vec![Rule {
            entity: "supplier".into(),
            tags: vec!["supplier:{id}".into(), "suppliers".into()],
            patterns: vec!["supplier:{id}:*".into()],
            dependents: vec!["payment".into()],
        }])
        .expect("valid rules")
    }

    #[test]
    fn rows_become_one_selector_per_tenant_with_the_event_id() {
        let mut txn = Txn::new(100);
        txn.row("acme", "supplier", Some("1"));
        txn.row("acme", "supplier", Some("2"));
        txn.row("acme", "supplier", Some("1"));
        txn.row("beta", "invoice", Some("9"));
        let req = txn.request(&rules(), &BTreeSet::new(), "pg-dcc-0-10", "test".into());
        assert_eq!(req.items.len(), 2);
        let acme = &req.items[0];
        assert_eq!(acme.tenant, "acme");
        assert_eq!(acme.tags, vec!["supplier:1", "suppliers", "payment", "supplier:2"]);
        assert_eq!(acme.patterns, vec!["supplier:1:*", "supplier:2:*"]);
        assert_eq!(req.items[1].tags, vec!["invoice", "invoice:9"]);
        assert_eq!(
            req.event_ids,
            vec![("acme".to_string(), "pg-dcc-0-10".to_string()), ("beta".to_string(), "pg-dcc-0-10".to_string())]
        );
    }

    #[test]
    fn a_big_transaction_widens_instead_of_growing() {
        let mut txn = Txn::new(3);
        for id in 0..10 {
            txn.row("acme", "supplier", Some(&id.to_string()));
        }
        assert_eq!(txn.ids, 0, "the ids gave way to the entity");
        let req = txn.request(&rules(), &BTreeSet::new(), "e", String::new());
        assert_eq!(req.items[0].tags, vec!["suppliers", "payment"]);
        assert_eq!(req.items[0].patterns, vec!["supplier:*:*"]);
        for tenant in 0..10 {
            txn.row(&format!("t{tenant}"), "supplier", Some("1"));
        }
        assert!(txn.rows.is_empty(), "too many tenants: the entity goes everywhere");
        let tenants = BTreeSet::from(["x".to_string(), "y".to_string()]);
        let req = txn.request(&rules(), &tenants, "e", String::new());
        assert_eq!(req.items.iter().map(|s| s.tenant.as_str()).collect::<Vec<_>>(), vec!["x", "y"]);
    }

    #[test]
    fn an_id_that_makes_no_valid_tag_widens_to_the_entity() {
        let mut txn = Txn::new(10);
        txn.row("acme", "invoice", Some("4 2"));
        let req = txn.request(&rules(), &BTreeSet::new(), "e", String::new());
        assert_eq!(req.items[0].tags, vec!["invoice"]);
    }

    #[test]
    fn a_truncate_everywhere_replaces_that_entitys_rows() {
        let mut txn = Txn::new(10);
        txn.row("acme", "supplier", Some("1"));
        txn.row("acme", "invoice", Some("2"));
        txn.everywhere("supplier");
        txn.row("beta", "supplier", Some("3"));
        assert_eq!(txn.ids, 1);
        assert_eq!(txn.everywhere_entities().collect::<Vec<_>>(), vec!["supplier"]);
        assert!(!txn.is_empty());
    }
}
