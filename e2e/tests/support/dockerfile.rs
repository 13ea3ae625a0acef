//! The Dockerfile: its stages, the binaries each installs, ENTRYPOINT and CMD.

use std::collections::BTreeSet;

/// Where the images install the binaries (and so where a command finds them).
pub const BIN_DIR: &str = "/usr/local/bin";

pub struct Stage {
    pub name: Option<String>,
    /// The stage this one is built `FROM`, when it is one of the file's.
    pub parent: Option<usize>,
    /// Files copied into /usr/local/bin by this stage itself.
    pub installs: BTreeSet<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
}

pub struct Dockerfile {
    pub stages: Vec<Stage>,
    /// Binaries some `cargo build ... --bin NAME` builds.
    pub cargo_bins: BTreeSet<String>,
}

impl Dockerfile {
    pub fn parse(text: &str) -> Dockerfile {
        let mut stages: Vec<Stage> = Vec::new();
        let mut cargo_bins = BTreeSet::new();
        for instruction in logical_lines(text) {
            let (keyword, rest) = instruction
                .split_once(char::is_whitespace)
                .unwrap_or((instruction.as_str(), ""));
            let rest = rest.trim();
            let words: Vec<&str> = rest.split_whitespace().collect();
            match keyword.to_ascii_uppercase().as_str() {
                "FROM" => {
                    let args: Vec<&str> = words
                        .iter()
                        .copied()
                        .filter(|w| !w.starts_with("--"))
                        .collect();
                    let base = args.first().copied().unwrap_or_default();
                    let name = match args.as_slice() {
                        [_, as_, name, ..] if as_.eq_ignore_ascii_case("as") => {
                            Some((*name).to_owned())
                        }
                        _ => None,
                    };
                    let parent = stages.iter().position(|s| s.name.as_deref() == Some(base));
                    stages.push(Stage {
                        name,
                        parent,
                        installs: BTreeSet::new(),
                        entrypoint: None,
                        cmd: None,
                    });
                }
                "COPY" | "ADD" => {
                    let paths: Vec<&str> = words
                        .iter()
                        .copied()
                        .filter(|w| !w.starts_with("--"))
                        .collect();
                    if let (Some((dest, sources)), Some(stage)) =
                        (paths.split_last(), stages.last_mut())
                    {
                        if dest.trim_end_matches('/') == BIN_DIR {
                            // Into the directory: the files keep their names.
                            stage
                                .installs
                                .extend(sources.iter().map(|s| basename(s).to_owned()));
                        } else if let Some(file) = dest.strip_prefix(&format!("{BIN_DIR}/")) {
                            stage.installs.insert(file.to_owned());
                        }
                    }
                }
                "ENTRYPOINT" => {
                    if let Some(stage) = stages.last_mut() {
                        stage.entrypoint = Some(exec_form(rest));
                        // As in Docker: a new ENTRYPOINT drops an inherited CMD.
                        stage.cmd.get_or_insert_with(Vec::new);
                    }
                }
                "CMD" => {
                    if let Some(stage) = stages.last_mut() {
                        stage.cmd = Some(exec_form(rest));
                    }
                }
                "RUN" => {
                    for (i, word) in words.iter().enumerate() {
                        if *word == "--bin" {
                            if let Some(bin) = words.get(i + 1) {
                                cargo_bins.insert((*bin).to_owned());
                            }
                        } else if let Some(bin) = word.strip_prefix("--bin=") {
                            cargo_bins.insert(bin.to_owned());
                        }
                    }
                }
                _ => {}
            }
        }
        Dockerfile { stages, cargo_bins }
    }

    /// The stage a build with `target` makes: the named one, or the last without.
    pub fn stage(&self, target: Option<&str>) -> Option<usize> {
        match target {
            Some(target) => self
                .stages
                .iter()
                .position(|s| s.name.as_deref() == Some(target)),
            None => self.stages.len().checked_sub(1),
        }
    }

    pub fn stage_names(&self) -> Vec<&str> {
        self.stages
            .iter()
            .filter_map(|s| s.name.as_deref())
            .collect()
    }

    /// What is in /usr/local/bin of the image `stage` makes.
    pub fn binaries(&self, stage: usize) -> BTreeSet<String> {
        let mut all = BTreeSet::new();
        let mut at = Some(stage);
        while let Some(i) = at {
            all.extend(self.stages[i].installs.iter().cloned());
            at = self.stages[i].parent;
        }
        all
    }

    fn inherited<T>(&self, stage: usize, get: impl Fn(&Stage) -> Option<&T>) -> Option<&T> {
        let mut at = Some(stage);
        while let Some(i) = at {
            if let Some(found) = get(&self.stages[i]) {
                return Some(found);
            }
            at = self.stages[i].parent;
        }
        None
    }

    pub fn entrypoint(&self, stage: usize) -> Vec<String> {
        self.inherited(stage, |s| s.entrypoint.as_ref())
            .cloned()
            .unwrap_or_default()
    }

    pub fn cmd(&self, stage: usize) -> Vec<String> {
        self.inherited(stage, |s| s.cmd.as_ref())
            .cloned()
            .unwrap_or_default()
    }

    /// The argv of a container of the image `stage` makes, with the deployment's
    /// overrides: `entrypoint` (Compose's `entrypoint`, Kubernetes' `command`)
    /// replaces ENTRYPOINT and drops CMD too; `command` (Compose's `command`,
    /// Kubernetes' `args`) replaces CMD.
    pub fn argv(
        &self,
        stage: usize,
        entrypoint: Option<Vec<String>>,
        command: Option<Vec<String>>,
    ) -> Vec<String> {
        match entrypoint {
            Some(entrypoint) => [entrypoint, command.unwrap_or_default()].concat(),
            None => [
                self.entrypoint(stage),
                command.unwrap_or_else(|| self.cmd(stage)),
            ]
            .concat(),
        }
    }
}

/// Instructions with their continuation lines joined, comments dropped.
pub fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && !current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                if !current.trim().is_empty() {
                    lines.push(current.trim().to_owned());
                }
                current.clear();
            }
        }
    }
    lines
}

/// `["a", "b"]` as it is; the shell form runs under `/bin/sh -c`.
pub fn exec_form(text: &str) -> Vec<String> {
    if text.starts_with('[') {
        if let Ok(words) = serde_yaml::from_str::<Vec<String>>(text) {
            return words;
        }
    }
    vec!["/bin/sh".to_owned(), "-c".to_owned(), text.to_owned()]
}

pub fn basename(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(path)
}
