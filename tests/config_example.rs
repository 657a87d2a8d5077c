//! The shipped `config/blocksnap.toml` documents every key with its default: it must parse
//! to exactly `Config::default()`, and name every key `Config::default()` renders.

use blocksnap::config::Config;
use std::path::Path;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/blocksnap.toml");

#[test]
fn shipped_config_is_the_defaults() {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let config = Config::parse(&text, Path::new(EXAMPLE)).unwrap();
    assert_eq!(config, Config::default());
}

#[test]
fn shipped_config_names_every_key() {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let shipped: toml::Table = toml::from_str(&text).unwrap();
    let defaults: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
    for (key, value) in &defaults {
        let here = shipped
            .get(key)
            .unwrap_or_else(|| panic!("`{key}` is missing from {EXAMPLE}"));
        if let (toml::Value::Table(default_table), toml::Value::Table(table)) = (value, here) {
            for sub in default_table.keys() {
                assert!(
                    table.contains_key(sub),
                    "`{key}.{sub}` is missing from {EXAMPLE}"
                );
            }
        }
    }
}
