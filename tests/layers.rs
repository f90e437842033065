//! The layers of `src/` stay true: a module imports only its own layer or the ones below, the
//! modules of a layer marked "each on its own" import none of each other, and no import cycle
//! joins two top-level modules. Read from the code's own `crate::` paths, so a new arrow upwards
//! fails here with its file and line, before it grows into a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer order, bottom first, written once here (and mirrored in `src/lib.rs`'s module
/// map). Each layer: its name, its top-level modules, and whether they must stay apart.
const LAYERS: &[(&str, &[&str], Apart)] = &[
    ("shapes", &["config"], Apart::No),
    ("model", &["model", "metrics"], Apart::No),
    ("stages", &["decode", "operators", "route"], Apart::No),
    ("engine", &["engine"], Apart::No),
    ("protocols", &["mqtt", "nats"], Apart::No),
    (
        "adapters",
        &["source", "sink", "store", "telemetry", "cluster"],
        Apart::Yes,
    ),
    ("wiring", &["app", "demo", "replay", "top"], Apart::No),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Apart {
    No,
    Yes,
}

/// One `crate::module` reference: which file and line it is on, and the module it reaches.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    file: String,
    line: usize,
    from: String,
    to: String,
}

/// The top-level module a file of `src/` belongs to; `None` for the crate root and the build
/// script, which are not part of a layer.
fn top_module(relative: &Path) -> Option<String> {
    let mut parts = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy());
    let first = parts.next()?.into_owned();
    if parts.next().is_some() {
        return Some(first);
    }
    let stem = first.strip_suffix(".rs")?;
    (!matches!(stem, "lib" | "main" | "build")).then(|| stem.to_owned())
}

/// `text` with comments, string and character literals blanked out (newlines kept, so line
/// numbers stay right): a path in a doc comment or a message is not an import.
fn code_only(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |out: &mut String, c: u8| out.push(if c == b'\n' { '\n' } else { ' ' });
    while i < bytes.len() {
        let rest = &bytes[i..];
        if rest.starts_with(b"//") {
            while i < bytes.len() && bytes[i] != b'\n' {
                out.push(' ');
                i += 1;
            }
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            while i < bytes.len() {
                if bytes[i..].starts_with(b"/*") {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if bytes[i..].starts_with(b"*/") {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, bytes[i]);
                    i += 1;
                }
            }
        } else if let Some(hashes) = raw_string_start(rest) {
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let open = if rest[0] == b'b' { 3 } else { 2 } + hashes;
            for _ in 0..open {
                out.push(' ');
            }
            i += open;
            while i < bytes.len() && !bytes[i..].starts_with(&close) {
                blank(&mut out, bytes[i]);
                i += 1;
            }
            for _ in 0..close.len().min(bytes.len() - i) {
                out.push(' ');
            }
            i += close.len();
        } else if bytes[i] == b'"' {
            out.push(' ');
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    out.push(' ');
                    i += 1;
                }
                blank(&mut out, bytes[i]);
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if bytes[i] == b'\'' && is_char_literal(rest) {
            let end = rest[1..]
                .iter()
                .position(|&c| c == b'\'')
                .map_or(rest.len(), |p| p + 2);
            for _ in 0..end {
                out.push(' ');
            }
            i += end;
        } else {
            let len = utf8_len(bytes[i]);
            out.push_str(&text[i..i + len]);
            i += len;
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0.. => 4,
        0xE0.. => 3,
        0xC0.. => 2,
        _ => 1,
    }
}

/// `r"`, `r#"`, `br"`...: the number of `#`s of a raw string starting here.
fn raw_string_start(rest: &[u8]) -> Option<usize> {
    let after_b = rest.strip_prefix(b"b").unwrap_or(rest);
    let after_r = after_b.strip_prefix(b"r")?;
    let hashes = after_r.iter().take_while(|&&c| c == b'#').count();
    (after_r.get(hashes) == Some(&b'"')).then_some(hashes)
}

/// A `'` that opens a character literal (`'a'`, `'\n'`, `'\u{1F600}'`), not a lifetime.
fn is_char_literal(rest: &[u8]) -> bool {
    match rest.get(1) {
        Some(b'\\') => true,
        Some(_) => {
            let len = utf8_len(rest[1]);
            rest.get(1 + len) == Some(&b'\'')
        }
        None => false,
    }
}

/// The top-level modules `code` reaches through `crate::` (and, in a top-level module's own
/// file, `super::` at the file's own level), with the line of each.
fn references(code: &str, top_level_file: bool) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    for prefix in ["crate::", "super::"] {
        if prefix == "super::" && !top_level_file {
            continue;
        }
        let mut from = 0;
        while let Some(at) = code[from..].find(prefix) {
            let start = from + at;
            from = start + prefix.len();
            let preceded_by_ident = start > 0
                && (bytes[start - 1].is_ascii_alphanumeric()
                    || bytes[start - 1] == b'_'
                    || bytes[start - 1] == b':');
            // In a top-level file, `super::` is the crate only at the file's own level (a
            // line that starts at column 0); inside `mod tests { .. }` it is the module itself.
            let line_start = code[..start].rfind('\n').map_or(0, |n| n + 1);
            let nested = prefix == "super::" && code[line_start..start].starts_with([' ', '\t']);
            if preceded_by_ident || nested {
                continue;
            }
            for (offset, name) in first_segments(&code[from..]) {
                let line = code[..from + offset].matches('\n').count() + 1;
                found.push((line, name));
            }
        }
    }
    found
}

/// The first path segments after `crate::`, with their offsets in `rest`: one name, or every
/// name at the top of a `{...}` group (`crate::{a, b::{c, d}}` gives `a` and `b`).
fn first_segments(rest: &str) -> Vec<(usize, String)> {
    let is_name = |c: char| c.is_alphanumeric() || c == '_';
    let leading = rest.len() - rest.trim_start().len();
    let rest = &rest[leading..];
    let mut names = Vec::new();
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 0;
        let mut expecting_name = true;
        let mut name: Option<(usize, String)> = None;
        for (at, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => expecting_name = true,
                c if depth == 0 && expecting_name && is_name(c) => {
                    name.get_or_insert_with(|| (leading + 1 + at, String::new()))
                        .1
                        .push(c);
                    continue;
                }
                _ => {}
            }
            if let Some(done) = name.take() {
                names.push(done);
                expecting_name = false;
            }
        }
        names.extend(name);
    } else {
        let name: String = rest.chars().take_while(|&c| is_name(c)).collect();
        if !name.is_empty() {
            names.push((leading, name));
        }
    }
    names.retain(|(_, n)| n != "self");
    names
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every import between two different top-level modules of the tree at `src`.
fn imports(src: &Path) -> Vec<Import> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for path in files {
        let relative = path.strip_prefix(src).expect("under src");
        let Some(from) = top_module(relative) else {
            continue;
        };
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
        let top_level_file = relative.components().count() == 1
            || relative.file_name().is_some_and(|n| n == "mod.rs")
                && relative.components().count() == 2;
        for (line, to) in references(&code_only(&text), top_level_file) {
            if to != from {
                found.push(Import {
                    file: format!("src/{}", relative.display()),
                    line,
                    from: from.clone(),
                    to,
                });
            }
        }
    }
    found
}

/// Every broken rule, one sentence each, naming the file and line.
fn violations(imports: &[Import]) -> Vec<String> {
    let layer_of = |module: &str| {
        LAYERS
            .iter()
            .position(|(_, modules, _)| modules.contains(&module))
    };
    let mut problems = Vec::new();
    for import in imports {
        let (Some(from), Some(to)) = (layer_of(&import.from), layer_of(&import.to)) else {
            let unknown = if layer_of(&import.from).is_none() {
                &import.from
            } else {
                &import.to
            };
            problems.push(format!(
                "{}:{}: module `{unknown}` is in no layer; add it to LAYERS in tests/layers.rs and to the module map in src/lib.rs",
                import.file, import.line
            ));
            continue;
        };
        if to > from {
            problems.push(format!(
                "{}:{}: `{}` (layer {}) imports `{}` from the layer above it ({}); move what it needs down to `{}` or lower, or pass it in",
                import.file, import.line, import.from, LAYERS[from].0, import.to, LAYERS[to].0, import.from
            ));
        } else if to == from && LAYERS[from].2 == Apart::Yes {
            problems.push(format!(
                "{}:{}: `{}` imports `{}`, but the {} layer's modules stand each on their own; share through the layers below",
                import.file, import.line, import.from, import.to, LAYERS[from].0
            ));
        }
    }
    problems.extend(cycles(imports));
    problems
}

/// Import cycles between top-level modules, each with the file and line of every arrow in it.
fn cycles(imports: &[Import]) -> Vec<String> {
    let mut edges: BTreeMap<&str, BTreeMap<&str, &Import>> = BTreeMap::new();
    for import in imports {
        edges
            .entry(&import.from)
            .or_default()
            .entry(&import.to)
            .or_insert(import);
    }
    let mut reported = BTreeSet::new();
    let mut problems = Vec::new();
    for &start in edges.keys() {
        // The shortest path back to `start`, by breadth-first search.
        let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        let mut closed = None;
        while let Some(node) = queue.pop_front() {
            for &next in edges.get(node).map(|e| e.keys()).into_iter().flatten() {
                if next == start {
                    closed = Some(node);
                    break;
                }
                if !previous.contains_key(next) && next != start {
                    previous.insert(next, node);
                    queue.push_back(next);
                }
            }
            if closed.is_some() {
                break;
            }
        }
        let Some(last) = closed else { continue };
        let mut path = vec![start];
        let mut node = last;
        while node != start {
            path.push(node);
            node = previous[node];
        }
        path[1..].reverse();
        let mut members: Vec<&str> = path.clone();
        members.sort_unstable();
        if !reported.insert(members) {
            continue;
        }
        let arrows: Vec<String> = path
            .iter()
            .zip(path.iter().cycle().skip(1))
            .map(|(from, to)| {
                let import = edges[from][to];
                format!("{from} -> {to} ({}:{})", import.file, import.line)
            })
            .collect();
        problems.push(format!("import cycle: {}", arrows.join(", ")));
    }
    problems
}

#[test]
fn every_module_imports_only_its_own_layer_and_the_ones_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = violations(&imports(&src));
    assert!(
        problems.is_empty(),
        "{} layer problems in src/ (layers, bottom first: {}):\n{}",
        problems.len(),
        LAYERS
            .iter()
            .map(|(name, modules, _)| format!("{name} [{}]", modules.join(", ")))
            .collect::<Vec<_>>()
            .join(" < "),
        problems.join("\n")
    );
}

#[test]
fn every_top_level_module_has_a_layer_and_lib_rs_maps_them_all() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("read src/lib.rs");
    let declared: BTreeSet<&str> = lib
        .lines()
        .filter_map(|line| line.trim().strip_prefix("pub mod "))
        .filter_map(|rest| rest.strip_suffix(';'))
        .collect();
    let layered: BTreeSet<&str> = LAYERS
        .iter()
        .flat_map(|(_, m, _)| m.iter().copied())
        .collect();
    assert_eq!(declared, layered, "src/lib.rs's modules and LAYERS differ");
    for (name, modules, _) in LAYERS {
        assert!(
            lib.contains(&format!("{name}:")),
            "src/lib.rs's module map does not name the layer `{name}` ({modules:?})"
        );
    }
}

/// The checker itself, on a made-up tree: it must catch what it is there to catch.
#[test]
fn an_upward_import_and_a_cycle_are_reported_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("weir-layers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let write = |path: &str, text: &str| {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "config/mod.rs",
        "//! shapes\n// crate::engine in a comment is fine\nconst S: &str = \"crate::app\";\nuse crate::{model::Reading,\n    engine::Plan};\n",
    );
    write("model.rs", "use crate::config::Shape;\n");
    write(
        "engine/mod.rs",
        "pub use super::operators::X;\nuse crate::model;\n",
    );
    write("operators/mod.rs", "fn f() { crate::route::g(); }\n");
    write("route.rs", "use crate::operators::X;\n");
    write("source/mod.rs", "use crate::sink::Outbox;\n");
    let found = imports(&dir);
    let problems = violations(&found);
    let _ = std::fs::remove_dir_all(&dir);
    let text = problems.join("\n");
    assert!(
        text.contains("src/config/mod.rs:4: `config` (layer shapes) imports `model`"),
        "{text}"
    );
    assert!(
        text.contains("src/config/mod.rs:5: `config` (layer shapes) imports `engine`"),
        "{text}"
    );
    assert!(
        !text.contains("`app`"),
        "comments and strings are not imports: {text}"
    );
    assert!(
        text.contains("src/source/mod.rs:1: `source` imports `sink`"),
        "{text}"
    );
    assert!(
        text.contains(
            "import cycle: model -> config (src/model.rs:1), config -> model (src/config/mod.rs:4)"
        ) || text.contains(
            "import cycle: config -> model (src/config/mod.rs:4), model -> config (src/model.rs:1)"
        ),
        "{text}"
    );
    assert!(
        text.contains("operators -> route (src/operators/mod.rs:1)")
            && text.contains("route -> operators (src/route.rs:1)"),
        "{text}"
    );
    assert!(
        !text.lines().any(|line| line.starts_with("src/engine/")),
        "engine may import the layers below it: {text}"
    );
}
