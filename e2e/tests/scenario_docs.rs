//! The README lists every failure scenario, and names no scenario that does not exist.

use std::collections::BTreeSet;

#[test]
fn the_readme_lists_every_scenario_and_no_other() {
    let readme = testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(readme).expect("README.md");
    let section = readme
        .split("## Failure scenarios")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a Failure scenarios section");
    let listed: BTreeSet<&str> = section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .collect();
    let known: BTreeSet<&str> = shop::scenarios::all().iter().map(|s| s.name).collect();
    assert_eq!(
        listed, known,
        "README's scenario table against the scenarios"
    );
}

#[test]
fn scenario_names_are_unique_and_findable() {
    let all = shop::scenarios::all();
    for s in &all {
        assert_eq!(shop::scenarios::find(s.name).map(|f| f.name), Some(s.name));
        assert!(!s.fault.is_empty() && !s.promise.is_empty(), "{}", s.name);
    }
    let names: BTreeSet<_> = all.iter().map(|s| s.name).collect();
    assert_eq!(names.len(), all.len());
    assert!(shop::scenarios::find("no-such-scenario").is_none());
}
