//! The module graph of `src/` has no import cycles.
//!
//! A node is a module at the granularity of files: `src/a/b.rs` is `a/b`, and a directory's
//! `mod.rs` is the directory (`src/a/mod.rs` is `a`). An edge `a → b` is a path in `a`'s code
//! that names something in `b`: `use crate::…` / `crate::…` (and `lopper::…` from the binary's
//! `cli/`) resolved to the longest module prefix, and `super::…` resolved from `a`'s parent.
//! Names the crate root re-exports (`crate::Model`, `crate::Error`) count as edges to the
//! module they come from. Edges between a module and its own ancestors or descendants are not
//! counted: a directory module declares its children, re-exports their items, and they use its
//! shared definitions; that is one unit. Comments and string literals are skipped.
//!
//! Every strongly connected component with more than one module is a cycle; the test prints
//! each and fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// All `.rs` files under `dir`, sorted.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Module name of a file relative to `src/`: `a/b.rs` → `a/b`, `a/mod.rs` → `a`, `lib.rs` and
/// `main.rs` → `` (a crate root).
fn module_of(rel: &Path) -> String {
    let s = rel.with_extension("").to_string_lossy().replace('\\', "/");
    match s.as_str() {
        "lib" | "main" => String::new(),
        _ => s.strip_suffix("/mod").unwrap_or(&s).to_string(),
    }
}

fn parent(m: &str) -> String {
    m.rsplit_once('/')
        .map_or(String::new(), |(p, _)| p.to_string())
}

/// `src` with comments, string and char literals blanked (newlines kept).
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (next == Some('"') || next == Some('#'))
            && (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_'))
        {
            // Raw string r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= c.len() {
                    break;
                }
                if c[j] == '"' && (0..hashes).all(|k| c.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                blank(&mut out, c[j]);
                j += 1;
            }
            i = j;
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                if let Some(&ch) = c.get(i) {
                    blank(&mut out, ch);
                }
                i += 1;
            }
            i += 1;
        } else if c[i] == '\'' {
            // A char literal ('x', '\n', '\u{..}'); otherwise a lifetime.
            if next == Some('\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                out.push(c[i]);
                i += 1;
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Expand a use tree (`a::{b, c::{d, e}}`, whitespace removed) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let Some(open) = tree.find('{') else {
        return vec![tree.to_string()];
    };
    let prefix = &tree[..open];
    let inner = tree[open + 1..]
        .strip_suffix('}')
        .unwrap_or(&tree[open + 1..]);
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (k, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..k]);
                start = k + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(p).into_iter().map(|s| format!("{prefix}{s}")))
        .collect()
}

/// Every `crate::…`, `super::…` (and `lopper::…`) path in stripped source `s`, as segments.
fn paths(s: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    // Use declarations first (they may hold groups), then blank them out.
    let mut rest = String::new();
    let mut tail = s;
    while let Some(k) = find_use(tail) {
        rest.push_str(&tail[..k]);
        let end = tail[k..].find(';').map_or(tail.len(), |e| k + e + 1);
        // Drop renames (`x as y`) and whitespace.
        let words: Vec<&str> = tail[k + 4..end].split_whitespace().collect();
        let mut tree = String::new();
        let mut w = 0;
        while w < words.len() {
            if words[w] == "as" {
                // Skip the new name, keep what follows it (`,` `}` `;`).
                let after = words.get(w + 1).copied().unwrap_or("");
                let cut = after.find([',', '}', ';']).unwrap_or(after.len());
                tree.push_str(&after[cut..]);
                w += 2;
            } else {
                tree.push_str(words[w]);
                w += 1;
            }
        }
        let tree = tree.trim_end_matches(';');
        for p in expand(tree) {
            out.push(p.split("::").map(str::to_string).collect());
        }
        tail = &tail[end..];
    }
    rest.push_str(tail);
    // Inline paths.
    let b = rest.as_bytes();
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let start_ok = i == 0 || !(is_ident(b[i - 1]) || b[i - 1] == b':');
        let head = ["crate::", "super::", "lopper::"]
            .into_iter()
            .find(|h| rest[i..].starts_with(h));
        match head {
            Some(_) if start_ok => {
                let mut j = i;
                while j < b.len() && (is_ident(b[j]) || b[j] == b':') {
                    j += 1;
                }
                let segs: Vec<String> = rest[i..j]
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                out.push(segs);
                i = j;
            }
            _ => i += 1,
        }
    }
    out
}

/// Start of the next `use` keyword (a whole word followed by a space) in `s`.
fn find_use(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut from = 0;
    while let Some(k) = s[from..].find("use ") {
        let k = from + k;
        if k == 0 || !(b[k - 1].is_ascii_alphanumeric() || b[k - 1] == b'_') {
            return Some(k);
        }
        from = k + 4;
    }
    None
}

/// Names the crate root re-exports, → the module they come from (`Model` → `model`).
fn root_reexports(lib: &str, modules: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for p in paths(lib) {
        // `pub use` paths in lib.rs have no `crate::` prefix; `paths` returned them as written.
        let segs: Vec<&str> = p.iter().map(String::as_str).collect();
        let segs = if segs.first() == Some(&"crate") {
            &segs[1..]
        } else {
            &segs[..]
        };
        if let (Some(name), Some(m)) = (segs.last(), longest_module("", segs, modules)) {
            map.insert(name.to_string(), m);
        }
    }
    map
}

/// The longest module `base/segs[..k]` that exists (`base` itself when none does).
fn longest_module(base: &str, segs: &[&str], modules: &BTreeSet<String>) -> Option<String> {
    let mut best = (!base.is_empty() && modules.contains(base)).then(|| base.to_string());
    let mut cur = base.to_string();
    for s in segs {
        cur = if cur.is_empty() {
            s.to_string()
        } else {
            format!("{cur}/{s}")
        };
        if modules.contains(&cur) {
            best = Some(cur.clone());
        } else {
            break;
        }
    }
    best
}

/// The module a path used in module `from` names, if any (extern crates and root items that
/// are not re-exports give none).
fn resolve(
    from: &str,
    path: &[String],
    modules: &BTreeSet<String>,
    root: &BTreeMap<String, String>,
) -> Option<String> {
    let mut base = String::new();
    let mut segs: Vec<&str> = path.iter().map(String::as_str).collect();
    match segs.first().copied() {
        Some("crate") | Some("$crate") | Some("lopper") => {
            segs.remove(0);
        }
        Some("super") => {
            base = from.to_string();
            while segs.first() == Some(&"super") {
                base = parent(&base);
                segs.remove(0);
            }
        }
        _ => return None,
    }
    if base.is_empty() {
        if let Some(m) = longest_module("", &segs, modules) {
            return Some(m);
        }
        return segs.first().and_then(|n| root.get(*n).cloned());
    }
    longest_module(&base, &segs, modules)
}

fn related(a: &str, b: &str) -> bool {
    let under = |x: &str, y: &str| x.starts_with(&format!("{y}/"));
    a == b || under(a, b) || under(b, a)
}

/// Strongly connected components with more than one node (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        let g = t.g;
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out.sort();
    t.out
}

/// The module graph of the crate sources under `src`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let rel = |p: &Path| p.strip_prefix(src).expect("under src").to_path_buf();
    let modules: BTreeSet<String> = files
        .iter()
        .map(|p| module_of(&rel(p)))
        .filter(|m| !m.is_empty())
        .collect();
    let read = |p: &Path| strip(&std::fs::read_to_string(p).expect("readable source"));
    let root = root_reexports(&read(&src.join("lib.rs")), &modules);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = module_of(&rel(f));
        if from.is_empty() {
            continue;
        }
        let edges = graph.entry(from.clone()).or_default();
        for p in paths(&read(f)) {
            if let Some(to) = resolve(&from, &p, &modules, &root) {
                if !related(&from, &to) {
                    edges.insert(to);
                }
            }
        }
    }
    graph
}

#[test]
fn checker_finds_a_cycle_and_ignores_comments() {
    let dir = std::env::temp_dir().join(format!("lopper-module-graph-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a")).unwrap();
    let write = |p: &str, s: &str| std::fs::write(dir.join(p), s).unwrap();
    write(
        "lib.rs",
        "pub mod a;\npub mod b;\npub mod c;\npub use c::Thing;\n",
    );
    write("a/mod.rs", "pub mod x;\npub mod y;\nuse crate::b::f;\n");
    write(
        "a/x.rs",
        "use super::{y::g, Z};\n// crate::c::h in a comment\n",
    );
    write(
        "a/y.rs",
        "fn f() { let s = \"crate::c::h\"; super::x::k(); }\n",
    );
    write("b.rs", "use crate::{a::x as ax, Thing};\n");
    write(
        "c.rs",
        "pub struct Thing;\nfn f<'a>(_: &'a str) -> char { 'c' }\n",
    );
    let g = module_graph(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        g["a/x"],
        BTreeSet::from(["a/y".to_string()]),
        "super::Z is the parent"
    );
    assert_eq!(g["a/y"], BTreeSet::from(["a/x".to_string()]));
    assert_eq!(
        g["b"],
        BTreeSet::from(["a/x".to_string(), "c".to_string()]),
        "crate::Thing is c's"
    );
    assert!(g["c"].is_empty(), "strings and comments hold no paths");
    assert_eq!(cycles(&g), vec![vec!["a/x".to_string(), "a/y".to_string()]]);
}

#[test]
fn no_import_cycles_between_modules() {
    // MODULE_GRAPH_SRC checks another source tree (e.g. a work in progress) with this binary.
    let src = std::env::var_os("MODULE_GRAPH_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let graph = module_graph(&src);
    assert!(
        graph.len() > 20 && graph.values().map(BTreeSet::len).sum::<usize>() > 50,
        "the checker found too few modules / imports to be reading src/"
    );
    let found = cycles(&graph);
    for c in &found {
        eprintln!("cycle: {}", c.join(" ↔ "));
    }
    assert!(found.is_empty(), "import cycles between modules: {found:?}");
}
