//! ARCHITECTURE.md is held to the code, as rust-analyzer's `tidy` holds its docs (issue 30):
//! every source file is in its code map, every function and constant it names exists, and no
//! two modules import each other (imports point one way: config to the components, the
//! engine to the store, never back).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn architecture() -> String {
    std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md is there")
}

/// Every `.rs` file under `dir`, as a path relative to the crate root.
fn sources(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root().join(dir)).expect("a source dir") {
        let path = entry.expect("an entry").path();
        let relative = path
            .strip_prefix(root())
            .expect("under the root")
            .to_path_buf();
        if path.is_dir() {
            found.extend(sources(&relative));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(relative.display().to_string());
        }
    }
    found.sort();
    found
}

/// The module path of a source file: `src/store/sled.rs` is `store::sled`, `src/store/mod.rs`
/// is `store`.
fn module_of(file: &str) -> String {
    let path = file.trim_start_matches("src/").trim_end_matches(".rs");
    let path = path.strip_suffix("/mod").unwrap_or(path);
    path.replace('/', "::")
}

/// The code without its `#[cfg(test)]` module: tests may import what they like.
fn product_code(file: &str) -> String {
    let text = std::fs::read_to_string(root().join(file)).expect("readable");
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

#[test]
fn every_source_file_is_in_the_code_map() {
    let map = architecture();
    let missing: Vec<String> = sources(Path::new("src"))
        .into_iter()
        .filter(|file| {
            // A file is mapped by its own row, or by its directory's (`src/proxy/`).
            let mut covered = map.contains(&format!("`{file}`"));
            let mut dir = Path::new(file).parent();
            while let Some(parent) = dir.filter(|d| !d.as_os_str().is_empty()) {
                covered |= map.contains(&format!("`{}/`", parent.display()));
                dir = parent.parent();
            }
            !covered
        })
        .collect();
    assert!(
        missing.is_empty(),
        "not in ARCHITECTURE.md's code map: {missing:?}"
    );
}

/// Names in backticks that look like code: `Type::function`, `module::function`, or a
/// constant in capitals.
fn named_items(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for quoted in text.split('`').skip(1).step_by(2) {
        let is_path = quoted.contains("::")
            && quoted
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        let is_constant = quoted.len() > 3
            && quoted.contains('_')
            && quoted
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if is_path || is_constant {
            names.insert(quoted.to_owned());
        }
    }
    names
}

#[test]
fn every_function_and_constant_it_names_exists() {
    let code: String = sources(Path::new("src"))
        .iter()
        .chain(sources(Path::new("bench/src")).iter())
        .chain(sources(Path::new("tests")).iter())
        .map(|file| std::fs::read_to_string(root().join(file)).expect("readable"))
        .collect();
    let missing: Vec<String> = named_items(&architecture())
        .into_iter()
        .filter(|name| {
            let last = name.rsplit("::").next().unwrap_or(name);
            let declared = [
                format!("fn {last}"),
                format!("const {last}"),
                format!("static {last}"),
                format!("struct {last}"),
                format!("enum {last}"),
                format!("trait {last}"),
                format!("mod {last}"),
                format!("type {last}"),
                // An enum variant or a field.
                format!("    {last},"),
                format!("    {last}("),
                format!("    {last} {{"),
                format!("pub {last}:"),
            ];
            // A wire or environment name, a socket option, another crate's function: named
            // in the code as it is.
            let used = code.contains(name.as_str());
            !used
                && !declared
                    .iter()
                    .any(|declaration| code.contains(declaration.as_str()))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names what the code does not have: {missing:?}"
    );
}

#[test]
fn no_two_modules_import_each_other() {
    let files = sources(Path::new("src"));
    let modules: BTreeMap<String, String> = files
        .iter()
        .filter(|file| !file.ends_with("main.rs") && !file.ends_with("lib.rs"))
        .map(|file| (module_of(file), file.clone()))
        .collect();
    // The longest module that `path` (a::b::Item) names.
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").collect();
        (1..=parts.len())
            .rev()
            .map(|n| parts[..n].join("::"))
            .find(|candidate| modules.contains_key(candidate))
    };
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &modules {
        let code = product_code(file);
        // `super::` names the parent of the module the code is in, for `x.rs` and
        // `x/mod.rs` alike.
        let parent = module.rsplit_once("::").map_or("", |(parent, _)| parent);
        for prefix in ["crate::", "super::"] {
            for at in code.match_indices(prefix).map(|(at, _)| at + prefix.len()) {
                let path: String = code[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let full = if prefix == "super::" && !parent.is_empty() {
                    format!("{parent}::{path}")
                } else {
                    path
                };
                if let Some(target) = resolve(full.trim_end_matches(':')) {
                    if &target != module {
                        imports.entry(module.clone()).or_default().insert(target);
                    }
                }
            }
        }
    }
    let mut circles = Vec::new();
    for (module, targets) in &imports {
        for target in targets {
            if module < target
                && imports
                    .get(target)
                    .is_some_and(|back| back.contains(module))
            {
                circles.push(format!("{module} <-> {target}"));
            }
        }
    }
    assert!(
        circles.is_empty(),
        "modules that import each other: {circles:?}"
    );
}

/// The type an `impl` line is for (`impl<T> Name<T>`, `impl Trait for Name`), or what a
/// `struct`, `enum`, `trait` or `type` line declares.
fn declared_type(line: &str) -> Option<String> {
    let line = line
        .trim_start()
        .trim_start_matches("pub(crate) ")
        .trim_start_matches("pub(super) ");
    let line = line.trim_start_matches("pub ");
    let rest = if let Some(rest) = line.strip_prefix("impl") {
        // Past the generics, then past `Trait for`, if any.
        let mut rest = rest.trim_start();
        if rest.starts_with('<') {
            let mut depth = 0;
            let end = rest.char_indices().find_map(|(at, c)| {
                match c {
                    '<' => depth += 1,
                    '>' => depth -= 1,
                    _ => {}
                }
                (depth == 0).then_some(at + 1)
            })?;
            rest = rest[end..].trim_start();
        }
        match rest.split_once(" for ") {
            Some((_, target)) => target.to_owned(),
            None => rest.to_owned(),
        }
    } else {
        ["struct ", "enum ", "trait ", "type "]
            .iter()
            .find_map(|keyword| line.strip_prefix(keyword))?
            .to_owned()
    };
    let name: String = rest
        .trim_start_matches('&')
        .rsplit("::")
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// Whether `code` declares `item` (a function, constant, type, module, variant or field).
fn declares(code: &str, item: &str) -> bool {
    [
        format!("fn {item}("),
        format!("fn {item}<"),
        format!("const {item}:"),
        format!("static {item}:"),
        format!("struct {item}"),
        format!("enum {item}"),
        format!("trait {item}"),
        format!("mod {item};"),
        format!("mod {item} "),
        format!("type {item}"),
        format!("    {item},"),
        format!("    {item}("),
        format!("    {item} {{"),
        format!("pub {item}:"),
        format!("macro_rules! {item}"),
    ]
    .iter()
    .any(|declaration| code.contains(declaration.as_str()))
}

/// Issue 43: a qualified name is checked whole. `Type::item` must be declared in a file that
/// declares or implements `Type`; `module::item` in that module's own file. ARCHITECTURE.md
/// named `Engine::record` after the function had moved to `Attempt::record`, and the check of
/// the last segment alone did not notice.
#[test]
fn every_qualified_name_it_uses_is_where_it_says() {
    let files: Vec<String> = ["src", "bench/src", "tests"]
        .iter()
        .flat_map(|dir| sources(Path::new(dir)))
        .collect();
    let code: BTreeMap<&str, String> = files
        .iter()
        .map(|file| {
            let text = std::fs::read_to_string(root().join(file)).expect("readable");
            (file.as_str(), text)
        })
        .collect();
    let all: String = code.values().map(String::as_str).collect();
    let module_file = |module: &str, file: &str| {
        let stem = file.trim_end_matches(".rs");
        let stem = stem.strip_suffix("/mod").unwrap_or(stem);
        stem.rsplit('/').next() == Some(module)
    };
    let misplaced: Vec<String> = named_items(&architecture())
        .into_iter()
        .filter(|name| name.contains("::"))
        .filter(|name| {
            let parts: Vec<&str> = name.split("::").collect();
            let (qualifier, item) = (parts[parts.len() - 2], parts[parts.len() - 1]);
            if all.contains(name.as_str()) && !code.values().any(|text| declares(text, item)) {
                // Another crate's item, named in the code as it is (`tokio::spawn`).
                return false;
            }
            let is_type = qualifier.starts_with(|c: char| c.is_ascii_uppercase());
            let ours = code.values().any(|text| {
                text.lines()
                    .any(|line| declared_type(line).as_deref() == Some(qualifier))
            });
            if is_type && !ours {
                // Another crate's type (sled's `Db::flush`).
                return false;
            }
            !code.iter().any(|(file, text)| {
                let holds_qualifier = if is_type {
                    text.lines()
                        .any(|line| declared_type(line).as_deref() == Some(qualifier))
                } else {
                    module_file(qualifier, file)
                        || (qualifier == "crate" && file.ends_with("lib.rs"))
                };
                holds_qualifier && declares(text, item)
            })
        })
        .collect();
    assert!(
        misplaced.is_empty(),
        "ARCHITECTURE.md names items where the code does not have them: {misplaced:?}"
    );
}
