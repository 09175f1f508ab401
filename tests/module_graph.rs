//! The modules of `src/` import each other without cycles, so that each can
//! be read knowing only what it imports: `session` uses `delivery` and never
//! the reverse, `presence` uses the hub and the hub knows nothing of
//! presence. Checked at two grains: files (`src/delivery/hub.rs`), and the
//! top-level modules that hold them (`delivery`, `presence`, `session`,
//! `broker`, ...). Only what the code uses counts: comments and each file's
//! `#[cfg(test)]` module are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A module's path from the crate root (`["delivery", "hub"]`), from its
/// file (`src/delivery/hub.rs`, `src/presence/mod.rs`).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).expect("a file under src/");
    let mut parts: Vec<String> = relative
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|last| last == "mod" || last == "lib")
    {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The code of `source` without its comments and its test module.
fn code(source: &str) -> String {
    let end = source.find("#[cfg(test)]").unwrap_or(source.len());
    source[..end]
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module paths `code` names from `crate::` or `super::`, each as far
/// as its identifiers go (`crate::delivery::hub::Hub` gives
/// `["delivery", "hub", "Hub"]`), resolved against `own` (the module the
/// code is in).
fn named_paths(code: &str, own: &[String]) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", own[..own.len().saturating_sub(1)].to_vec()),
    ] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let preceded_by_ident = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            rest = &rest[at + prefix.len()..];
            if preceded_by_ident {
                continue;
            }
            let mut path = base.clone();
            let mut tail = rest;
            loop {
                let len = tail
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                if len == 0 {
                    break;
                }
                path.push(tail[..len].to_string());
                tail = &tail[len..];
                match tail.strip_prefix("::") {
                    Some(after) => tail = after,
                    None => break,
                }
            }
            paths.push(path);
        }
    }
    paths
}

/// The longest prefix of `path` that is a module of `modules`.
fn resolve(path: &[String], modules: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|prefix| modules.contains(prefix))
}

/// Every module of `src/` and the modules it imports (not itself, nor its
/// own parents: `super::` from a child is how Rust reaches a sibling).
fn import_graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let sources: Vec<(Vec<String>, String)> = files
        .iter()
        .map(|file| (module_of(&src, file), fs::read_to_string(file).unwrap()))
        .collect();
    let modules: BTreeSet<Vec<String>> = sources.iter().map(|(m, _)| m.clone()).collect();
    let mut graph = BTreeMap::new();
    for (module, source) in &sources {
        let imports = named_paths(&code(source), module)
            .iter()
            .filter_map(|path| resolve(path, &modules))
            .filter(|target| !module.starts_with(target))
            .collect();
        graph.insert(module.clone(), imports);
    }
    graph
}

/// A cycle of `graph`, if it has one, as the modules along it.
fn find_cycle<N: Ord + Clone>(graph: &BTreeMap<N, BTreeSet<N>>) -> Option<Vec<N>> {
    fn visit<N: Ord + Clone>(
        node: &N,
        graph: &BTreeMap<N, BTreeSet<N>>,
        done: &mut BTreeSet<N>,
        path: &mut Vec<N>,
    ) -> Option<Vec<N>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.clone());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

/// The graph between top-level modules: `delivery` imports `presence` if
/// any file under one imports any file under the other.
fn top_level(
    graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
) -> BTreeMap<String, BTreeSet<String>> {
    let top = |module: &Vec<String>| module.first().cloned().unwrap_or_default();
    let mut tops: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, imports) in graph {
        let from = top(module);
        let entry = tops.entry(from.clone()).or_default();
        entry.extend(imports.iter().map(top).filter(|to| *to != from));
    }
    tops
}

fn shown(cycle: &[Vec<String>]) -> String {
    cycle
        .iter()
        .map(|m| format!("crate::{}", m.join("::")))
        .collect::<Vec<_>>()
        .join(" -> ")
}

#[test]
fn no_two_files_of_src_import_each_other_even_through_others() {
    let graph = import_graph();
    assert!(graph.len() > 30, "read only {} modules", graph.len());
    if let Some(cycle) = find_cycle(&graph) {
        panic!("an import cycle: {}", shown(&cycle));
    }
}

#[test]
fn no_two_top_level_modules_import_each_other_even_through_others() {
    let graph = top_level(&import_graph());
    assert!(
        graph["presence"].contains("delivery") && graph["session"].contains("delivery"),
        "the graph lost edges it must have: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("an import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn a_cycle_is_found_and_named() {
    let own = vec!["delivery".to_string(), "hub".to_string()];
    let paths = named_paths(
        "use crate::presence::View;\nuse super::outbox::{Outbox};\nlet m = crate::metrics::Metrics::new();",
        &own,
    );
    let as_text: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        as_text,
        [
            "presence::View",
            "metrics::Metrics::new",
            "delivery::outbox"
        ]
    );
    let graph: BTreeMap<&str, BTreeSet<&str>> = [
        ("hub", BTreeSet::from(["view"])),
        ("view", BTreeSet::from(["presence"])),
        ("presence", BTreeSet::from(["hub"])),
        ("outbox", BTreeSet::new()),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["hub", "view", "presence", "hub"])
    );
    let acyclic: BTreeMap<&str, BTreeSet<&str>> = [
        ("hub", BTreeSet::from(["outbox"])),
        ("presence", BTreeSet::from(["hub", "outbox"])),
        ("outbox", BTreeSet::new()),
    ]
    .into_iter()
    .collect();
    assert_eq!(find_cycle(&acyclic), None);
}
