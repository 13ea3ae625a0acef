//! The relay's modules import each other without circles: each module can be
//! read, tested and changed from the modules below it.
//!
//! Reads `relay/src`, takes every module file as a node and every `crate::…` or
//! `super::…` path in code (comments and `#[cfg(test)]` parts left out) as an edge
//! to the deepest module it names. A parent declaring a child module, and a child
//! using its parent's items, is how Rust nests modules and is not counted; any
//! other circle fails the test, naming the modules and where each edge comes from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// One module file: its path in the crate and its code.
struct Source {
    module: Module,
    file: PathBuf,
    code: Vec<(usize, String)>,
}

fn module_of(src: &Path, file: &Path) -> Option<Module> {
    let relative = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if parts.is_empty() && (stem == "lib" || stem == "main") {
        return None;
    }
    if stem != "mod" {
        parts.push(stem.to_owned());
    }
    Some(parts)
}

/// Modules declared `#[cfg(test)] mod name;` by `code`: test-only children.
fn test_children(code: &str) -> BTreeSet<String> {
    let mut children = BTreeSet::new();
    let lines: Vec<&str> = code.lines().map(str::trim).collect();
    for pair in lines.windows(2) {
        if pair[0] == "#[cfg(test)]" {
            let declared = pair[1]
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ");
            if let Some(name) = declared
                .strip_prefix("mod ")
                .and_then(|r| r.strip_suffix(';'))
            {
                children.insert(name.trim().to_owned());
            }
        }
    }
    children
}

fn read_sources(src: &Path) -> Vec<Source> {
    let mut files = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read relay/src") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let texts: BTreeMap<PathBuf, String> = files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).expect("read a source file");
            (f, text)
        })
        .collect();
    // Test-only modules, by their path.
    let mut test_only: BTreeSet<Module> = BTreeSet::new();
    for (file, text) in &texts {
        let parent = module_of(src, file).unwrap_or_default();
        for child in test_children(text) {
            let mut module = parent.clone();
            module.push(child);
            test_only.insert(module);
        }
    }
    texts
        .into_iter()
        .filter_map(|(file, text)| {
            let module = module_of(src, &file)?;
            if (1..=module.len()).any(|n| test_only.contains(&module[..n])) {
                return None;
            }
            let code = text
                .lines()
                .enumerate()
                // The code of the module: its own `#[cfg(test)]` part comes last.
                .take_while(|(_, line)| line.trim() != "#[cfg(test)]")
                .filter(|(_, line)| !line.trim_start().starts_with("//"))
                .map(|(n, line)| (n + 1, line.to_owned()))
                .collect();
            Some(Source { module, file, code })
        })
        .collect()
}

/// Every module path a line names with `crate::` or `super::`, grouped imports
/// (`crate::{a, b::c}`) expanded.
fn named_paths(line: &str, module: &Module) -> Vec<Module> {
    let mut found = Vec::new();
    for (start, base) in [("crate::", Vec::new()), ("super::", parent(module))] {
        let mut rest = line;
        while let Some(at) = rest.find(start) {
            let preceded = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
            rest = &rest[at + start.len()..];
            if preceded {
                continue;
            }
            let mut base = base.clone();
            let mut tail = rest;
            // `super::super::…`
            while let Some(more) = tail.strip_prefix("super::") {
                base = parent(&base);
                tail = more;
            }
            if let Some(group) = tail.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    found.push(join(&base, item.trim()));
                }
            } else {
                found.push(join(&base, tail));
            }
        }
    }
    found
}

fn parent(module: &Module) -> Module {
    module[..module.len().saturating_sub(1)].to_vec()
}

fn join(base: &Module, path: &str) -> Module {
    let mut module = base.clone();
    for segment in path.split("::") {
        let name: String = segment
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() || name == "self" {
            break;
        }
        module.push(name);
        if segment.len() != module.last().map_or(0, String::len) {
            break;
        }
    }
    module
}

/// The deepest known module that `path` starts with.
fn resolve(path: &Module, known: &BTreeSet<Module>) -> Option<Module> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|m| known.contains(m))
}

fn related(a: &Module, b: &Module) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Strongly connected components of more than one module (Tarjan).
fn circles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct Walk<'e> {
        edges: &'e BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<Module, usize>,
        low: BTreeMap<Module, usize>,
        stack: Vec<Module>,
        on_stack: BTreeSet<Module>,
        found: Vec<Vec<Module>>,
    }
    impl Walk<'_> {
        fn visit(&mut self, v: &Module) {
            let n = self.index.len();
            self.index.insert(v.clone(), n);
            self.low.insert(v.clone(), n);
            self.stack.push(v.clone());
            self.on_stack.insert(v.clone());
            for w in self.edges.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v.clone(), low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v.clone(), low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(&w);
                    let done = &w == v;
                    component.push(w);
                    if done {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.found
}

#[test]
fn the_relays_modules_import_each_other_without_circles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let sources = read_sources(&src);
    let known: BTreeSet<Module> = sources.iter().map(|s| s.module.clone()).collect();
    assert!(
        known.contains(&vec!["stream".to_owned()]) && known.len() > 20,
        "the sources were not found under {}",
        src.display()
    );
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    let mut why: BTreeMap<(Module, Module), String> = BTreeMap::new();
    for source in &sources {
        edges.entry(source.module.clone()).or_default();
        for (line_no, line) in &source.code {
            for path in named_paths(line, &source.module) {
                let Some(target) = resolve(&path, &known) else {
                    continue;
                };
                if related(&source.module, &target) {
                    continue;
                }
                edges
                    .entry(source.module.clone())
                    .or_default()
                    .insert(target.clone());
                why.entry((source.module.clone(), target))
                    .or_insert_with(|| format!("{}:{line_no}", source.file.display()));
            }
        }
    }
    let found = circles(&edges);
    let described: Vec<String> = found
        .iter()
        .map(|component| {
            let names: Vec<String> = component.iter().map(|m| m.join("::")).collect();
            let inside: Vec<String> = why
                .iter()
                .filter(|((from, to), _)| component.contains(from) && component.contains(to))
                .map(|((from, to), at)| format!("{} -> {} ({at})", from.join("::"), to.join("::")))
                .collect();
            format!("[{}]: {}", names.join(", "), inside.join("; "))
        })
        .collect();
    assert!(
        found.is_empty(),
        "import circles in relay/src:\n{}",
        described.join("\n")
    );
}

#[test]
fn the_graph_sees_paths_groups_and_parents() {
    let module = vec!["replication".to_owned(), "error".to_owned()];
    assert_eq!(
        named_paths("use super::protocol::ProtocolError;", &module),
        [vec![
            "replication".to_owned(),
            "protocol".to_owned(),
            "ProtocolError".to_owned()
        ]]
    );
    assert_eq!(
        named_paths("use crate::{ack::Txn, sink};", &module),
        [
            vec!["ack".to_owned(), "Txn".to_owned()],
            vec!["sink".to_owned()]
        ]
    );
    assert!(named_paths("let x = my_crate::a;", &module).is_empty());
    let mut edges = BTreeMap::new();
    let a = vec!["a".to_owned()];
    let b = vec!["b".to_owned()];
    edges.insert(a.clone(), BTreeSet::from([b.clone()]));
    edges.insert(b.clone(), BTreeSet::from([a.clone()]));
    assert_eq!(circles(&edges).len(), 1);
}
