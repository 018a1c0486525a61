//! The places a user meets `idemproxy run`'s settings agree with the command itself: README's
//! settings table, `deploy/config.example.toml` and `idemproxy run --help` name the same
//! settings, with the same `IDEMPROXY_*` variables and the same defaults. A setting added to
//! one and forgotten in another, or a default changed in one, fails here.

mod support;

use std::collections::{BTreeMap, BTreeSet};

/// A setting as `run --help` shows it.
#[derive(Debug)]
struct Help {
    env: Option<String>,
    default: Option<String>,
}

/// `--flag` → its variable and default, from `idemproxy run --help`.
fn from_help() -> BTreeMap<String, Help> {
    let output = std::process::Command::new(support::binary::path())
        .args(["run", "--help"])
        .output()
        .expect("the binary runs");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut settings = BTreeMap::new();
    let mut lines = help.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(flag) = line.trim_start().strip_prefix("--") else {
            continue;
        };
        let flag = format!("--{}", flag.split_whitespace().next().unwrap_or_default());
        if flag == "--help" {
            continue;
        }
        // The description: the lines up to the next flag.
        let mut text = String::new();
        while let Some(next) = lines.peek() {
            if next.trim_start().starts_with('-') {
                break;
            }
            text.push_str(next.trim());
            text.push(' ');
            lines.next();
        }
        let bracketed = |name: &str| {
            let start = text.find(&format!("[{name}: "))? + name.len() + 3;
            let end = start + text[start..].find(']')?;
            Some(text[start..end].to_owned())
        };
        let env = bracketed("env").map(|env| env.trim_end_matches('=').to_owned());
        settings.insert(
            flag,
            Help {
                env,
                default: bracketed("default"),
            },
        );
    }
    settings
}

/// `--flag` → (variable, default cell), from README's table of `run`'s settings.
fn from_readme() -> BTreeMap<String, (String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut settings = BTreeMap::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split(" | ").map(str::trim).collect();
        let [flags, envs, default, ..] = cells[..] else {
            continue;
        };
        let Some(flags) = flags.strip_prefix("| ") else {
            continue;
        };
        if !flags.starts_with("`--") || !envs.starts_with("`IDEMPROXY_") {
            continue;
        }
        let flags: Vec<&str> = flags.split(", ").map(|f| f.trim_matches('`')).collect();
        let envs: Vec<&str> = envs.split(", ").map(|e| e.trim_matches('`')).collect();
        assert_eq!(flags.len(), envs.len(), "one variable per flag: {line}");
        for (flag, env) in flags.into_iter().zip(envs) {
            settings.insert(flag.to_owned(), (env.to_owned(), default.to_owned()));
        }
    }
    settings
}

/// `key` → its value when set (`None` when only shown commented out), from the example file's
/// top-level keys (per-method tables excluded).
fn from_example() -> BTreeMap<String, Option<String>> {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/config.example.toml"
    ))
    .expect("deploy/config.example.toml");
    let mut keys = BTreeMap::new();
    // A commented-out table (`# [methods."/…"]`) runs to the next blank line; a real one to
    // the end of the file.
    let mut in_commented_table = false;
    for line in example.lines() {
        let commented = line.starts_with('#');
        let body = line.trim_start_matches('#').trim();
        if line.trim().is_empty() {
            in_commented_table = false;
        }
        if body.starts_with('[') {
            if !commented {
                break;
            }
            in_commented_table = true;
        }
        if in_commented_table {
            continue;
        }
        let Some((key, value)) = body.split_once(" = ") else {
            continue;
        };
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '-' || c.is_ascii_digit())
        {
            continue;
        }
        let value = value.split(" #").next().unwrap_or_default().trim();
        let value = (!commented).then(|| value.trim_matches('"').to_owned());
        keys.insert(key.to_owned(), value);
    }
    keys
}

/// `--flag` → its declaration, from `idemproxy::config::RunSettings`.
fn declared() -> BTreeMap<String, idemproxy::config::Declared> {
    idemproxy::config::declared()
        .into_iter()
        .map(|setting| (setting.flag.clone(), setting))
        .collect()
}

#[test]
fn readme_example_file_and_help_show_each_declared_setting_with_its_default() {
    let declared = declared();
    let help = from_help();
    let readme = from_readme();
    let example = from_example();
    assert!(
        declared.len() > 30,
        "the declarations were read: {declared:?}"
    );

    let declared_flags: BTreeSet<&String> = declared.keys().collect();
    let help_flags: BTreeSet<&String> = help.keys().collect();
    let readme_flags: BTreeSet<&String> = readme.keys().collect();
    assert_eq!(
        declared_flags, help_flags,
        "`run --help` and the declarations name different settings"
    );
    assert_eq!(
        declared_flags, readme_flags,
        "README's settings table and the declarations name different settings"
    );
    for (flag, setting) in &declared {
        let shown = &help[flag];
        let (env, default) = &readme[flag];
        assert_eq!(
            shown.env.as_deref(),
            Some(setting.env.as_str()),
            "{flag}: --help's variable"
        );
        assert_eq!(env, &setting.env, "{flag}: README's variable");
        if setting.switch {
            // A switch: off unless given, as README says.
            assert_eq!(setting.default.as_deref(), Some("false"), "{flag}");
            assert_eq!(default, "off", "{flag}: README's default");
            continue;
        }
        assert_eq!(shown.default, setting.default, "{flag}: --help's default");
        // README shows a default in backticks exactly when there is one, and it is the one.
        let value = default.strip_prefix('`').and_then(|d| d.strip_suffix('`'));
        assert_eq!(
            value,
            setting.default.as_deref(),
            "{flag}: README's default {default}"
        );
    }

    // Every setting a file may hold is in the example, set to its default or commented out.
    let file_keys: BTreeSet<String> = declared
        .values()
        .filter(|setting| setting.in_file)
        .map(|setting| setting.flag.trim_start_matches("--").to_owned())
        .collect();
    let example_keys: BTreeSet<String> = example.keys().cloned().collect();
    assert_eq!(
        file_keys, example_keys,
        "deploy/config.example.toml and the declarations name different settings"
    );
    for (key, value) in &example {
        let Some(value) = value else { continue };
        if key == "upstream" {
            continue; // required: the example names one, there is no default
        }
        assert_eq!(
            Some(value),
            declared[&format!("--{key}")].default.as_ref(),
            "{key}: the example file's value is not the declared default"
        );
    }
}
