//! The documents as a reader follows them: every relative link of the
//! README, BENCHMARKS.md and docs/ leads to a file that exists, and to a
//! heading of it where it names one; and every metric family the daemon
//! can export is documented in docs/metrics.md. No privileges needed.
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md"), root().join("BENCHMARKS.md")];
    let dir = std::fs::read_dir(root().join("docs")).expect("docs/");
    docs.extend(
        dir.filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "md")),
    );
    docs
}

/// A heading's anchor as GitHub makes it: lower case, punctuation but `-`
/// and `_` dropped, spaces to `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect()
}

/// The targets of the `[text](target)` links of a markdown text.
fn links(text: &str) -> Vec<String> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(target, _)| target.to_owned()))
        .filter(|t| !t.contains(' ') && !t.starts_with("http"))
        .collect()
}

#[test]
fn every_link_of_the_documents_leads_to_a_file_and_a_heading() {
    let mut broken = vec![];
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("a document");
        for link in links(&text) {
            let (path, heading) = link.split_once('#').unwrap_or((&link, ""));
            let target = match path {
                "" => doc.clone(),
                path => doc.parent().expect("a directory").join(path),
            };
            let Ok(target_text) = std::fs::read_to_string(&target) else {
                if !target.is_dir() {
                    broken.push(format!("{}: {link} (no such file)", doc.display()));
                }
                continue;
            };
            if !heading.is_empty() && !anchors(&target_text).contains(&heading.to_owned()) {
                broken.push(format!("{}: {link} (no such heading)", doc.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Every `"observer_…"` name in the daemon's source: the families it
/// exports.
fn families_in_source(dir: &Path, names: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("source dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            families_in_source(&path, names);
        } else if path.extension().is_some_and(|x| x == "rs") {
            let text = std::fs::read_to_string(&path).expect("source");
            for piece in text.split("\"observer_").skip(1) {
                let name: String = piece
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if piece[name.len()..].starts_with('"') {
                    names.push(format!("observer_{name}"));
                }
            }
        }
    }
}

#[test]
fn every_metric_family_is_documented() {
    let mut names = vec![];
    families_in_source(&root().join("observer/src"), &mut names);
    names.sort();
    names.dedup();
    assert!(names.len() > 30, "families found: {names:?}");
    let doc = std::fs::read_to_string(root().join("docs/metrics.md")).expect("docs/metrics.md");
    // A histogram's series are documented as its family.
    let family = |n: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| n.strip_suffix(suffix))
            .unwrap_or(n)
            .to_owned()
    };
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !doc.contains(&format!("`{n}")) && !doc.contains(&format!("`{}`", family(n))))
        .collect();
    assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
}
