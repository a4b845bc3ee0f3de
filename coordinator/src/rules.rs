//! Rules and the entity dependency graph: how a write event becomes a selector.
//!
//! An entity with a rule invalidates the rule's tag and pattern templates
//! (`{id}` is the event's id); an entity without one invalidates the tags
//! `{entity}` and `{entity}:{id}`. Each dependent entity, transitively,
//! contributes its collection-level templates (those without `{id}`); a
//! dependent without a rule contributes its tag `{entity}`. The graph must be
//! acyclic: a cycle is refused at start-up with the cycle named.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use shared::{glob, names};

/// The `{id}` placeholder.
const ID: &str = "{id}";

/// One `[[rules]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The entity this rule is for.
    pub entity: String,
    /// Tag templates.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Key pattern templates.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Entities whose collection-level tags and patterns go too.
    #[serde(default)]
    pub dependents: Vec<String>,
}

/// The loaded, checked rules.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    /// Rules by entity.
    rules: BTreeMap<String, Rule>,
}

/// Tags and patterns an event resolves to (before the event's own extras).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Tags to invalidate.
    pub tags: Vec<String>,
    /// Patterns to invalidate.
    pub patterns: Vec<String>,
    /// Every dependent entity reached, in breadth-first order.
    pub dependents: Vec<String>,
}

impl RuleSet {
    /// Checks the rules: names, templates, duplicates, and cycles. Every
    /// problem is reported at once.
    pub fn new(rules: Vec<Rule>) -> Result<RuleSet, String> {
        let mut problems = Vec::new();
        let mut by_entity = BTreeMap::new();
        for rule in rules {
            let entity = rule.entity.clone();
            if let Err(e) = names::validate_tag(&entity) {
                problems.push(format!("rule entity {entity:?}: {}", e.message));
            }
            for template in &rule.tags {
                if let Err(why) = check_template(template) {
                    problems.push(format!("rule {entity:?}: tag template {template:?} {why}"));
                } else if let Err(e) = names::validate_tag(&template.replace(ID, "0")) {
                    problems.push(format!("rule {entity:?}: tag template {template:?}: {}", e.message));
                }
            }
            for template in &rule.patterns {
                if let Err(why) = check_template(template) {
                    problems.push(format!("rule {entity:?}: pattern template {template:?} {why}"));
                } else if let Err(e) = names::validate_pattern(&template.replace(ID, "0"), false) {
                    problems.push(format!("rule {entity:?}: pattern template {template:?}: {}", e.message));
                }
            }
            for dependent in &rule.dependents {
                if let Err(e) = names::validate_tag(dependent) {
                    problems.push(format!("rule {entity:?}: dependent {dependent:?}: {}", e.message));
                }
            }
            if by_entity.insert(entity.clone(), rule).is_some() {
                problems.push(format!("entity {entity:?} has more than one rule"));
            }
        }
        let set = RuleSet { rules: by_entity };
        if let Some(cycle) = set.find_cycle() {
            problems.push(format!("the rules' dependents form a cycle: {}", cycle.join(" -> ")));
        }
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems.join("; "))
        }
    }

    /// The loaded rules.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.values()
    }

    /// Depth-first search for a cycle; returns it as a path ending where it began.
    fn find_cycle(&self) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Visiting,
            Done,
        }
        fn visit(
            set: &RuleSet,
            entity: &str,
            marks: &mut BTreeMap<String, Mark>,
            path: &mut Vec<String>,
        ) -> Option<Vec<String>> {
            match marks.get(entity) {
                Some(Mark::Done) => return None,
                Some(Mark::Visiting) => {
                    let start = path.iter().position(|e| e == entity).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(entity.to_string());
                    return Some(cycle);
                }
                None => {}
            }
            marks.insert(entity.to_string(), Mark::Visiting);
            path.push(entity.to_string());
            for dependent in set.rules.get(entity).map(|r| r.dependents.as_slice()).unwrap_or_default() {
                if let Some(cycle) = visit(set, dependent, marks, path) {
                    return Some(cycle);
                }
            }
            path.pop();
            marks.insert(entity.to_string(), Mark::Done);
            None
        }
        let mut marks = BTreeMap::new();
        for entity in self.rules.keys() {
            if let Some(cycle) = visit(self, entity, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
        None
    }

    /// What an event for `entity` (with `id`, if given) invalidates.
    pub fn resolve(&self, entity: &str, id: Option<&str>) -> Resolved {
        let mut out = Resolved::default();
        match self.rules.get(entity) {
            Some(rule) => {
                for template in &rule.tags {
                    if let Some(tag) = fill(template, id, false) {
                        push_unique(&mut out.tags, tag);
                    }
                }
                for template in &rule.patterns {
                    if let Some(pattern) = fill(template, id, true) {
                        push_unique(&mut out.patterns, pattern);
                    }
                }
            }
            None => {
                push_unique(&mut out.tags, entity.to_string());
                if let Some(id) = id {
                    push_unique(&mut out.tags, format!("{entity}:{id}"));
                }
            }
        }
        // Dependents, breadth first; the graph is acyclic, `seen` guards anyway.
        let mut seen = BTreeSet::from([entity.to_string()]);
        let mut queue: VecDeque<&str> = self.direct_dependents(entity).collect();
        while let Some(dependent) = queue.pop_front() {
            if !seen.insert(dependent.to_string()) {
                continue;
            }
            out.dependents.push(dependent.to_string());
            match self.rules.get(dependent) {
                Some(rule) => {
                    for t in rule.tags.iter().filter(|t| !t.contains(ID)) {
                        push_unique(&mut out.tags, t.clone());
                    }
                    for p in rule.patterns.iter().filter(|p| !p.contains(ID)) {
                        push_unique(&mut out.patterns, p.clone());
                    }
                }
                None => push_unique(&mut out.tags, dependent.to_string()),
            }
            queue.extend(self.direct_dependents(dependent));
        }
        out
    }

    /// What a change to every row of `entity` invalidates (a `TRUNCATE`, or
    /// a transaction too big to list its rows): [`Self::resolve`] without an
    /// id, and each pattern template with `{id}` widened to match any id. A
    /// tag template with `{id}` names one row and cannot be widened: entries
    /// cached only under such a tag are not reached (see the README).
    pub fn resolve_collection(&self, entity: &str) -> Resolved {
        let mut out = self.resolve(entity, None);
        if let Some(rule) = self.rules.get(entity) {
            for template in rule.patterns.iter().filter(|p| p.contains(ID)) {
                push_unique(&mut out.patterns, template.replace(ID, "*"));
            }
        }
        out
    }

    fn direct_dependents<'a>(&'a self, entity: &str) -> impl Iterator<Item = &'a str> {
        self.rules.get(entity).into_iter().flat_map(|r| r.dependents.iter().map(String::as_str))
    }

    /// The rules and the entity graph, for `GET /v1/rules`.
    pub fn describe(&self) -> serde_json::Value {
        let mut entities: BTreeSet<&str> = self.rules.keys().map(String::as_str).collect();
        entities.extend(self.rules.values().flat_map(|r| r.dependents.iter().map(String::as_str)));
        let graph: Vec<serde_json::Value> = entities
            .iter()
            .map(|e| {
                let resolved = self.resolve(e, None);
                serde_json::json!({
                    "entity": e,
                    "has_rule": self.rules.contains_key(*e),
                    "dependents": self.direct_dependents(e).collect::<Vec<_>>(),
                    "reaches": resolved.dependents,
                    "collection_tags": resolved.tags,
                    "collection_patterns": resolved.patterns,
                })
            })
            .collect();
        let edges: Vec<serde_json::Value> = self
            .rules
            .values()
            .flat_map(|r| r.dependents.iter().map(move |d| serde_json::json!({"from": r.entity, "to": d})))
            .collect();
        serde_json::json!({
            "rules": self.rules.values().collect::<Vec<_>>(),
            "default_rule": {"tags": ["{entity}", "{entity}:{id}"], "patterns": []},
            "graph": {"entities": graph, "edges": edges},
        })
    }
}

/// Checks that `{...}` appears only as `{id}`.
fn check_template(template: &str) -> Result<(), &'static str> {
    let stripped = template.replace(ID, "");
    if stripped.contains('{') || stripped.contains('}') {
        Err("may use only the placeholder {id}")
    } else {
        Ok(())
    }
}

/// Fills `{id}`; `None` when the template needs an id and the event has none.
/// In patterns the id is escaped, so an id like `4*` matches only itself.
fn fill(template: &str, id: Option<&str>, is_pattern: bool) -> Option<String> {
    if !template.contains(ID) {
        return Some(template.to_string());
    }
    let id = id?;
    let id = if is_pattern { escape_glob(id) } else { id.to_string() };
    Some(template.replace(ID, &id))
}

/// Escapes glob metacharacters.
pub fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    debug_assert!(glob::check(&out).is_ok());
    out
}

fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(entity: &str, tags: &[&str], patterns: &[&str], dependents: &[&str]) -> Rule {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
        Rule { entity: entity.into(), tags: v(tags), patterns: v(patterns), dependents: v(dependents) }
    }

    fn contract_rules() -> RuleSet {
        RuleSet::new(vec![
            rule(
                "supplier",
                &["supplier:{id}", "suppliers"],
                &["suppliers:list:*", "supplier:{id}:*"],
                &["supplier_payment", "purchase_order"],
            ),
            rule(
                "supplier_payment",
                &["supplier_payments", "supplier_payment:{id}"],
                &["supplier_payments:list:*"],
                &["ledger"],
            ),
        ])
        .expect("valid rules")
    }

    #[test]
    fn default_rule_uses_entity_and_id() {
        let set = RuleSet::default();
        let r = set.resolve("invoice", Some("7"));
        assert_eq!(r.tags, vec!["invoice", "invoice:7"]);
        assert!(r.patterns.is_empty());
        assert_eq!(set.resolve("invoice", None).tags, vec!["invoice"]);
    }

    #[test]
    fn rule_with_dependents_resolves_transitively() {
        let r = contract_rules().resolve("supplier", Some("42"));
        assert_eq!(r.tags, vec!["supplier:42", "suppliers", "supplier_payments", "purchase_order", "ledger"]);
        assert_eq!(r.patterns, vec!["suppliers:list:*", "supplier:42:*", "supplier_payments:list:*"]);
        assert_eq!(r.dependents, vec!["supplier_payment", "purchase_order", "ledger"]);
    }

    #[test]
    fn templates_with_id_are_skipped_without_an_id() {
        let r = contract_rules().resolve("supplier", None);
        assert_eq!(r.tags[0], "suppliers");
        assert!(!r.patterns.iter().any(|p| p.contains("{id}")));
    }

    #[test]
    fn ids_are_escaped_in_patterns() {
        let r = contract_rules().resolve("supplier", Some("4*"));
        assert!(r.patterns.contains(&"supplier:4\\*:*".to_string()));
        assert!(r.tags.contains(&"supplier:4*".to_string()));
        assert!(glob::matches("supplier:4\\*:*", "supplier:4*:x"));
        assert!(!glob::matches("supplier:4\\*:*", "supplier:45:x"));
    }

    #[test]
    fn cycles_are_refused_and_named() {
        let err =
            RuleSet::new(vec![rule("a", &[], &[], &["b"]), rule("b", &[], &[], &["c"]), rule("c", &[], &[], &["a"])])
                .expect_err("a cycle");
        assert!(err.contains("a -> b -> c -> a"), "{err}");
        let err = RuleSet::new(vec![rule("self", &[], &[], &["self"])]).expect_err("self loop");
        assert!(err.contains("self -> self"), "{err}");
    }

    #[test]
    fn diamonds_are_not_cycles() {
        let set = RuleSet::new(vec![
            rule("a", &[], &[], &["b", "c"]),
            rule("b", &[], &[], &["d"]),
            rule("c", &[], &[], &["d"]),
        ])
        .expect("a diamond is fine");
        assert_eq!(set.resolve("a", None).dependents, vec!["b", "c", "d"]);
    }

    #[test]
    fn bad_templates_and_duplicates_are_refused() {
        assert!(RuleSet::new(vec![rule("x", &["{name}"], &[], &[])]).is_err());
        assert!(RuleSet::new(vec![rule("x", &["a b"], &[], &[])]).is_err());
        assert!(RuleSet::new(vec![rule("x", &[], &["a[b"], &[])]).is_err());
        assert!(RuleSet::new(vec![rule("x", &[], &["*"], &[])]).is_err());
        assert!(RuleSet::new(vec![rule("x", &[], &[], &[]), rule("x", &[], &[], &[])]).is_err());
    }

    #[test]
    fn describe_lists_rules_and_edges() {
        let d = contract_rules().describe();
        assert_eq!(d["rules"].as_array().map(Vec::len), Some(2));
        assert_eq!(d["graph"]["edges"].as_array().map(Vec::len), Some(3));
    }
}
