//! The READMEs' map of the code cannot rot: every link whose text is a
//! name in code (`` [`Publisher::publish`](src/broker/redis/publisher.rs) ``)
//! must point at a file that exists and defines that name (and, for
//! `Type::name`, that type too). Both READMEs must hold the table of the
//! three places (published, received, handed to local clients), the
//! separate thread and the absence of republishing.

use std::path::Path;

/// `(name, path)` of every link `` [`name`](path) `` in `text` whose path
/// is a Rust file.
fn code_links(text: &str) -> Vec<(String, String)> {
    let mut links = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("[`") {
        rest = &rest[start + 2..];
        let Some(end) = rest.find("`](") else { break };
        let name = &rest[..end];
        let after = &rest[end + 3..];
        let Some(close) = after.find(')') else { break };
        let path = &after[..close];
        let is_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if is_name && path.ends_with(".rs") {
            links.push((name.to_string(), path.to_string()));
        }
        rest = after;
    }
    links
}

/// Whether `source` defines `name` as an item (`fn name`, `struct name`,
/// `const name`, ...).
fn defines(source: &str, name: &str) -> bool {
    [
        "fn", "struct", "enum", "trait", "const", "static", "type", "mod",
    ]
    .iter()
    .any(|keyword| {
        let item = format!("{keyword} {name}");
        source.match_indices(&item).any(|(at, _)| {
            let next = source[at + item.len()..].chars().next();
            next.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
        })
    })
}

/// Whether `source` has an `impl` block for `ty`.
fn implements(source: &str, ty: &str) -> bool {
    source.lines().any(|line| {
        let line = line.trim_start();
        line.starts_with("impl")
            && line
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .any(|word| word == ty)
    })
}

fn check(readme: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join(readme)).expect("the README exists");
    let links = code_links(&text);
    for (name, path) in &links {
        let file = root.join(path);
        let source = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{readme}: [`{name}`]({path}): {e}"));
        let mut parts = name.rsplitn(2, "::");
        let item = parts.next().expect("a name");
        assert!(
            defines(&source, item),
            "{readme}: [`{name}`]({path}): {path} defines no `{item}`"
        );
        if let Some(ty) = parts.next() {
            assert!(
                defines(&source, ty) && implements(&source, ty),
                "{readme}: [`{name}`]({path}): {path} has no type `{ty}` with an impl"
            );
        }
    }
    links.len()
}

#[test]
fn every_code_link_in_the_readmes_names_what_its_file_defines() {
    for readme in ["README.md", "README.fr.md"] {
        let checked = check(readme);
        assert!(
            checked >= 7,
            "{readme}: the table of where each step is links {checked} names, fewer than its 7"
        );
    }
}

#[test]
fn a_link_to_a_name_its_file_lacks_is_caught() {
    let links = code_links(
        "see [`Publisher::publish`](src/broker/redis/publisher.rs) and [`src/x.rs`](src/x.rs)",
    );
    assert_eq!(
        links,
        [(
            "Publisher::publish".to_string(),
            "src/broker/redis/publisher.rs".to_string()
        )]
    );
    let source = "pub struct Publisher;\nimpl Publisher {\n    pub fn publish_ephemeral() {}\n}\n";
    assert!(!defines(source, "publish"), "a longer name is not the name");
    assert!(defines(source, "publish_ephemeral"));
    assert!(implements(source, "Publisher"));
    assert!(!implements(source, "Subscriber"));
}
