//! The library's top-level modules form a ladder: no chain of `crate::` imports leads from a
//! module back to itself, so `src/` can be read from the wire formats up to the server.
//!
//! Reads the sources: every `crate::<module>` path in a module's code (comments left out)
//! is an edge from that module to `<module>`. Run with `--nocapture` to see the ladder.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A module's edges: the modules it names, each with a file that names it.
type Edges = BTreeMap<String, PathBuf>;

#[test]
fn top_level_modules_import_one_another_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    assert!(graph.len() > 5, "found the modules of {}", src.display());
    if let Some(cycle) = find_cycle(&graph) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|pair| {
                let file = &graph[&pair[0]][&pair[1]];
                format!("{} -> {} (in {})", pair[0], pair[1], file.display())
            })
            .collect();
        panic!("import cycle:\n  {}", steps.join("\n  "));
    }
    for (level, modules) in ladder(&graph).iter().enumerate() {
        println!("{level}: {}", modules.join(", "));
    }
}

#[test]
fn paths_are_read_from_use_lists_and_code_not_comments() {
    let known: BTreeSet<String> = ["hub", "node", "outbox", "protocol", "web"]
        .map(String::from)
        .into();
    let text = "use crate::{hub::Hub, outbox::{Next, Outbox}};\n\
                /// [`Node`](crate::node::Node)\n\
                let page = crate::web::asset(path); // crate::node\n\
                use crate::protocol;\n";
    let named: Vec<String> = named_modules(text, &known).into_iter().collect();
    assert_eq!(named, ["hub", "outbox", "protocol", "web"]);
}

/// Each top-level module of `src` (a file, a folder with everything in it, or both: `x.rs`
/// with its submodules in `x/`) and the modules its code names.
fn graph(src: &Path) -> BTreeMap<String, Edges> {
    let mut files: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in fs::read_dir(src).expect("read src/") {
        let path = entry.expect("read src/").path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            files.entry(name).or_default().extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            files.entry(name).or_default().push(path);
        }
    }
    let known: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(module, paths)| {
            let mut edges = Edges::new();
            for path in paths {
                let text = fs::read_to_string(path).expect("read a source file");
                for used in named_modules(&text, &known) {
                    if used != *module {
                        edges.entry(used).or_insert_with(|| path.clone());
                    }
                }
            }
            (module.clone(), edges)
        })
        .collect()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).expect("read a source folder") {
        let path = entry.expect("read a source folder").path();
        if path.is_dir() {
            found.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
    found
}

/// The modules of `known` that `text` names as `crate::<module>`, directly or in a
/// `crate::{…}` list, outside comments.
fn named_modules(text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" // ").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let heads = match rest.strip_prefix('{') {
                Some(list) => list_heads(list),
                None => vec![ident(rest)],
            };
            named.extend(
                heads
                    .into_iter()
                    .filter(|h| known.contains(*h))
                    .map(String::from),
            );
        }
    }
    named
}

/// The first name of each item of a `{…}` use list (after its `{`), nested lists skipped.
fn list_heads(list: &str) -> Vec<&str> {
    let mut heads = vec![ident(list)];
    let mut depth = 0;
    for (i, c) in list.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => heads.push(ident(list[i + 1..].trim_start())),
            _ => {}
        }
    }
    heads
}

fn ident(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// A cycle, as the modules along it with the first repeated at the end, if there is one.
fn find_cycle(graph: &BTreeMap<String, Edges>) -> Option<Vec<String>> {
    fn visit(
        module: &str,
        graph: &BTreeMap<String, Edges>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| m == module) {
            let mut cycle = path[at..].to_vec();
            cycle.push(module.to_owned());
            return Some(cycle);
        }
        if done.contains(module) {
            return None;
        }
        path.push(module.to_owned());
        for next in graph[module].keys() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(module.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|module| visit(module, graph, &mut Vec::new(), &mut done))
}

/// The modules by level, from the bottom: each uses only modules of lower levels.
fn ladder(graph: &BTreeMap<String, Edges>) -> Vec<Vec<String>> {
    fn level(module: &str, graph: &BTreeMap<String, Edges>) -> usize {
        graph[module]
            .keys()
            .map(|used| level(used, graph) + 1)
            .max()
            .unwrap_or(0)
    }
    let mut levels: Vec<Vec<String>> = Vec::new();
    for module in graph.keys() {
        let at = level(module, graph);
        if levels.len() <= at {
            levels.resize(at + 1, Vec::new());
        }
        levels[at].push(module.clone());
    }
    levels
}
