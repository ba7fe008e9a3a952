//! A plugin's typed config: the `[plugins.config]` table, as JSON, parsed into
//! [`Sink::Config`](crate::Sink::Config) before `init`.

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The config of a plugin that takes no settings: only an empty (or absent) table parses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// Parses a config as the host passes it (JSON text; blank means no table: `{}`). The error
/// names the field that does not parse, e.g.
/// ``config: window_minutes: invalid type: string "x", expected u32 at line 1 column 22``.
pub fn parse<T: DeserializeOwned>(config: &str) -> Result<T, String> {
    let text = if config.trim().is_empty() {
        "{}"
    } else {
        config
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(describe)?;
    de.end()
        .map_err(|e| format!("config: {e} (after the JSON object)"))?;
    Ok(value)
}

/// [`parse`] of a JSON value (handy in tests: `config::from_value(json!({...}))`).
pub fn from_value<T: DeserializeOwned>(config: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(config).map_err(describe)
}

fn describe<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> String {
    let path = e.path().to_string();
    if path == "." {
        format!("config: {}", e.inner())
    } else {
        format!("config: {path}: {}", e.inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Cfg {
        key_prefix: String,
        window_minutes: u32,
        nested: Nested,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Nested {
        ttl: u64,
    }

    impl Default for Cfg {
        fn default() -> Self {
            Cfg {
                key_prefix: "p:".into(),
                window_minutes: 10,
                nested: Nested::default(),
            }
        }
    }

    #[test]
    fn blank_is_an_empty_table_and_defaults_apply() {
        assert_eq!(parse::<Cfg>("  ").unwrap(), Cfg::default());
        assert_eq!(parse::<NoConfig>("").unwrap(), NoConfig {});
        assert_eq!(parse::<NoConfig>("{}").unwrap(), NoConfig {});
        let c: Cfg = parse(r#"{"window_minutes": 5, "nested": {"ttl": 9}}"#).unwrap();
        assert_eq!((c.window_minutes, c.nested.ttl), (5, 9));
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse::<Cfg>(r#"{"window_minutes": "x"}"#).unwrap_err();
        assert!(
            e.starts_with("config: window_minutes: invalid type: string \"x\", expected u32"),
            "{e}"
        );
        assert!(e.contains("line 1 column"), "{e}");
        let e = parse::<Cfg>(r#"{"nested": {"ttl": -1}}"#).unwrap_err();
        assert!(e.starts_with("config: nested.ttl: invalid value"), "{e}");
        let e = parse::<Cfg>(r#"{"key_prefx": "x"}"#).unwrap_err();
        assert!(e.contains("unknown field `key_prefx`"), "{e}");
        let e = parse::<NoConfig>(r#"{"a": 1}"#).unwrap_err();
        assert!(e.contains("unknown field `a`"), "{e}");
        assert!(parse::<Cfg>("{").unwrap_err().starts_with("config: "));
        let e = from_value::<Cfg>(serde_json::json!({"nested": {"ttl": "1"}})).unwrap_err();
        assert!(e.starts_with("config: nested.ttl: invalid type"), "{e}");
    }
}
