//! The documents a reader meets first say what is true of the project, and say it so that an
//! outsider can use it: BENCHMARKS.md names the commit, date and command of every figure and
//! puts the current figures before the history; the README keeps its two commands.

fn read(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn benchmarks_put_current_figures_first_each_labelled_by_commit_date_and_command() {
    let b = read("BENCHMARKS.md");
    // Work periods mean nothing to a reader; commits do (`git checkout` reproduces them).
    for (n, line) in b.lines().enumerate() {
        assert!(
            !line.to_lowercase().contains("session"),
            "BENCHMARKS.md:{}: labels by work period: {line}",
            n + 1
        );
    }
    let current = b
        .find("\n## Current figures")
        .expect("a Current figures section");
    let history = b.find("\n## History").expect("a History section");
    assert!(current < history, "current figures come before the history");
    // Every figure block of the current section opens with its label line: the commit(s) it
    // measured (or, for an ad-hoc probe outside the repository, that it is one), and the date.
    let section = &b[current..history];
    let labels: Vec<&str> = section
        .lines()
        .filter(|l| l.starts_with("**Commit") || l.starts_with("**Probe"))
        .collect();
    assert!(labels.len() >= 5, "labelled figures: {labels:?}");
    for l in labels {
        assert!(l.contains(" · 20"), "label without a date: {l}");
        if l.starts_with("**Commit") {
            let commit = l.split('`').nth(1).unwrap_or("");
            assert!(
                commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit()),
                "label without a commit: {l}"
            );
        }
    }
    for sub in section.split("\n### ").skip(1) {
        let title = sub.lines().next().unwrap_or("");
        assert!(
            sub.contains("\n**Commit"),
            "current figures '{title}' carry no commit label"
        );
    }
}

#[test]
fn readme_keeps_its_two_commands() {
    let r = read("README.md");
    for marker in ["main-command", "test-command"] {
        let open = format!("<!-- {marker} -->");
        let close = format!("<!-- /{marker} -->");
        let a = r
            .find(&open)
            .unwrap_or_else(|| panic!("README has no {open}"));
        let z = r
            .find(&close)
            .unwrap_or_else(|| panic!("README has no {close}"));
        let body = &r[a + open.len()..z];
        assert!(body.contains("cargo "), "{marker}: {body}");
    }
}
