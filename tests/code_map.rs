//! The READMEs' map of the code cannot rot: every link whose text is a
//! name in code
//! (`` [`Publisher::publish`](src/broker/redis/publisher.rs#L192) ``) must
//! point at a file that exists and defines that name (and, for
//! `Type::name`, that type too), at the line its anchor names, so that a
//! reader lands on it (GitHub opens `#L192` there); a function that moves
//! fails this test, which says its new line. Both READMEs must hold the table of the
//! three places (published, received, handed to local clients), the
//! separate thread and the absence of republishing.

use std::path::Path;

/// A link `` [`name`](path#Lline) `` to a Rust file.
#[derive(Debug, PartialEq, Eq)]
struct CodeLink {
    name: String,
    path: String,
    /// The `#L` anchor's line, if the link has one.
    line: Option<usize>,
}

/// Every link `` [`name`](path) `` in `text` whose path is a Rust file.
fn code_links(text: &str) -> Vec<CodeLink> {
    let mut links = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("[`") {
        rest = &rest[start + 2..];
        let Some(end) = rest.find("`](") else { break };
        let name = &rest[..end];
        let after = &rest[end + 3..];
        let Some(close) = after.find(')') else { break };
        let target = &after[..close];
        let (path, line) = match target.split_once("#L") {
            Some((path, line)) => (path, line.parse().ok()),
            None => (target, None),
        };
        let is_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if is_name && path.ends_with(".rs") {
            links.push(CodeLink {
                name: name.to_string(),
                path: path.to_string(),
                line,
            });
        }
        rest = after;
    }
    links
}

/// Whether `line` defines `name` as an item (`fn name`, `struct name`,
/// `const name`, ...).
fn defines_on(line: &str, name: &str) -> bool {
    [
        "fn", "struct", "enum", "trait", "const", "static", "type", "mod",
    ]
    .iter()
    .any(|keyword| {
        let item = format!("{keyword} {name}");
        line.match_indices(&item).any(|(at, _)| {
            let before = line[..at].chars().next_back();
            let next = line[at + item.len()..].chars().next();
            before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
                && next.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
        })
    })
}

/// Whether `source` defines `name` as an item.
fn defines(source: &str, name: &str) -> bool {
    source.lines().any(|line| defines_on(line, name))
}

/// The line (from 1) where `source` defines `item`: with `ty`, the first
/// definition after the start of an `impl` block for `ty`.
fn definition_line(source: &str, ty: Option<&str>, item: &str) -> Option<usize> {
    let lines: Vec<&str> = source.lines().collect();
    let from = match ty {
        Some(ty) => lines.iter().position(|line| implements(line, ty))?,
        None => 0,
    };
    (from..lines.len())
        .find(|&i| defines_on(lines[i], item))
        .map(|i| i + 1)
}

/// Whether `source` has an `impl` block for `ty` (one of its lines
/// starts one).
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
    for CodeLink { name, path, line } in &links {
        let file = root.join(path);
        let source = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{readme}: [`{name}`]({path}): {e}"));
        let mut parts = name.rsplitn(2, "::");
        let item = parts.next().expect("a name");
        let ty = parts.next();
        assert!(
            defines(&source, item),
            "{readme}: [`{name}`]({path}): {path} defines no `{item}`"
        );
        if let Some(ty) = ty {
            assert!(
                defines(&source, ty) && implements(&source, ty),
                "{readme}: [`{name}`]({path}): {path} has no type `{ty}` with an impl"
            );
        }
        let at = definition_line(&source, ty, item);
        assert!(
            line.is_some() && *line == at,
            "{readme}: [`{name}`]({path}#L{}): `{name}` is defined at line {} of {path}; \
             write the link as ({path}#L{})",
            line.map_or("?".to_string(), |l| l.to_string()),
            at.unwrap_or(0),
            at.unwrap_or(0)
        );
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
fn a_link_to_a_name_its_file_lacks_or_a_stale_line_is_caught() {
    let links = code_links(
        "see [`Publisher::publish`](src/broker/redis/publisher.rs#L3) and [`src/x.rs`](src/x.rs)",
    );
    assert_eq!(
        links,
        [CodeLink {
            name: "Publisher::publish".to_string(),
            path: "src/broker/redis/publisher.rs".to_string(),
            line: Some(3),
        }]
    );
    let source = "pub struct Publisher;\nfn publish() {}\nimpl Publisher {\n    pub fn publish_ephemeral() {}\n    pub fn publish() {}\n}\n";
    assert!(
        !defines_on("    pub fn publish_ephemeral() {}", "publish"),
        "a longer name is not the name"
    );
    assert!(defines(source, "publish_ephemeral"));
    assert!(implements(source, "Publisher"));
    assert!(!implements(source, "Subscriber"));
    assert_eq!(definition_line(source, None, "publish"), Some(2));
    assert_eq!(
        definition_line(source, Some("Publisher"), "publish"),
        Some(5),
        "the method, not the free function of the same name"
    );
}
