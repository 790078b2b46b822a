//! The README's configuration reference against the real schema: every key the loader
//! accepts is in it, it names no key the loader refuses, and its block, as written, is
//! the defaults.
//!
//! The keys are not listed here: they are read from the schema itself, by asking the
//! loader about a key no table has (`deny_unknown_fields` answers with every field the
//! table expects, straight from serde's derive), table by table, so a key added to the
//! schema is missing from the README until someone documents it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use tessera_protocol::FragmentRoute;
use tessera_protocol::config::{Config, ConfigError};

const README: &str = include_str!("../../README.md");

/// The heading the reference block follows.
const REFERENCE_HEADING: &str = "### Configuration file";

/// A key no table of the schema has.
const PROBE: &str = "zz_not_a_key";

/// The fields of the table written as `header` (`[gateway]`, `[[fragment]]`; "" for the
/// top level), or `None` when `header` is not a table of the schema.
fn fields(header: &str) -> Option<Vec<String>> {
    let text = format!("{header}\n{PROBE} = 1\n");
    let message = match Config::from_toml(&text) {
        Err(ConfigError::Parse { message, .. }) => message,
        _ => return None,
    };
    // serde: "unknown field `x`, expected one of `a`, `b`" (or "expected `a` or `b`").
    let (_, expected) = message.split_once(&format!("unknown field `{PROBE}`, expected"))?;
    let expected = expected.lines().next().unwrap_or("");
    Some(
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

/// Every key of the schema as `table.key` (`fragment.fallback`), walking nested tables.
fn schema_keys() -> BTreeSet<String> {
    let top = fields("").expect("the top level refuses unknown keys and names its tables");
    assert!(top.len() >= 8, "the top level names {top:?}");
    let mut keys = BTreeSet::new();
    let mut tables: Vec<String> = top;
    while let Some(table) = tables.pop() {
        let found = fields(&format!("[{table}]")).or_else(|| fields(&format!("[[{table}]]")));
        match found {
            Some(found) => {
                assert!(!found.is_empty(), "[{table}] names no field");
                tables.extend(found.iter().map(|f| format!("{table}.{f}")));
            }
            None => {
                keys.insert(table);
            }
        }
    }
    keys
}

/// The keys written in `toml`, commented-out examples included, as `table.key`. A key is
/// a line `key = …` or `# key = …` at the start of a line; its table the last `[table]`
/// or `[[table]]` line above it (commented or not).
fn toml_keys(toml: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut table = "";
    for line in toml.lines() {
        let line = line.strip_prefix("# ").unwrap_or(line);
        if let Some(header) = line.strip_prefix('[') {
            let end = header.find(']').unwrap_or(header.len());
            table = header[..end].trim_start_matches('[');
        } else if let Some((key, _)) = line.split_once(" = ")
            && !key.is_empty()
            && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            keys.insert(format!("{table}.{key}"));
        }
    }
    keys
}

/// The keys of every TOML block in the README.
fn readme_keys(readme: &str) -> BTreeSet<String> {
    readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("\n```"))
        .flat_map(|(block, _)| toml_keys(block))
        .collect()
}

/// The README's reference block: the first TOML block after [`REFERENCE_HEADING`].
fn reference_block(readme: &str) -> String {
    let (_, after) = readme
        .split_once(&format!("\n{REFERENCE_HEADING}\n"))
        .unwrap_or_else(|| panic!("the README has no {REFERENCE_HEADING:?} heading"));
    let (_, block) = after
        .split_once("```toml\n")
        .expect("a TOML block follows the heading");
    block
        .split_once("\n```")
        .expect("the block ends")
        .0
        .to_string()
}

#[test]
fn the_schema_is_read_from_the_loader() {
    let keys = schema_keys();
    for key in [
        "gateway.listen",
        "http.send_timeout",
        "store.memcached",
        "bus.amqp",
        "workers.render_token",
        "fragment.name",
        "fragment.fallback",
    ] {
        assert!(keys.contains(key), "{key} not found in {keys:?}");
    }
}

#[test]
fn every_config_key_is_in_the_readme() {
    let schema = schema_keys();
    let documented = toml_keys(&reference_block(README));
    let missing: Vec<&String> = schema.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "config keys missing from the README's reference block ({REFERENCE_HEADING}): {missing:?}"
    );
    let unknown: Vec<String> = readme_keys(README).difference(&schema).cloned().collect();
    assert!(
        unknown.is_empty(),
        "the README's TOML blocks name keys the loader refuses: {unknown:?}"
    );
}

#[test]
fn the_reference_block_is_the_defaults() {
    let block = reference_block(README);
    let config = Config::from_toml(&block)
        .unwrap_or_else(|e| panic!("the README's reference block does not load: {e}"));
    let [route] = &config.fragments[..] else {
        panic!("the reference block shows one example route");
    };
    let defaults = Config {
        fragments: vec![FragmentRoute::new(route.name.clone(), route.render.clone())],
        ..Config::default()
    };
    assert_eq!(
        format!("{config:#?}"),
        format!("{defaults:#?}"),
        "the README's reference block must show the real defaults"
    );
}
