//! docs/runbook.md names only commands that exist: every `blkrep VERB` in its command blocks
//! and inline code is a subcommand of this build's `blkrep` (`blkrep VERB [ACTION] --help`
//! succeeds) and every `--flag` it passes is in that help. The sections the VM scenario
//! `test-vm/scenarios/runbook.sh` runs literally are there, with a node on every block, and
//! the Drills section holds only its placeholder line.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn repo_file(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// A fenced code block: the `## ` section it is in, its info string, its text.
struct Block {
    section: String,
    info: String,
    text: String,
}

/// The fenced blocks of a Markdown text, and the text outside them (for inline code). A
/// fence is a line of three backticks (indented or not) whose info string holds no
/// backtick; a line like "```` ```sh ```` means ..." is inline code, not a fence.
fn parse(md: &str) -> (Vec<Block>, String) {
    let mut blocks = Vec::new();
    let mut prose = String::new();
    let mut section = String::new();
    let mut open: Option<(usize, Block)> = None;
    for line in md.lines() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let trimmed = &line[indent..];
        match open.take() {
            Some((_, b)) if trimmed.trim_end() == "```" => blocks.push(b),
            Some((ind, mut b)) => {
                b.text.push_str(&line[ind.min(indent)..]);
                b.text.push('\n');
                open = Some((ind, b));
            }
            None if trimmed.starts_with("```") && !trimmed[3..].contains('`') => {
                open = Some((
                    indent,
                    Block {
                        section: section.clone(),
                        info: trimmed[3..].trim().to_string(),
                        text: String::new(),
                    },
                ));
            }
            None => {
                if let Some(h) = line.strip_prefix("## ") {
                    section = h.trim().to_string();
                }
                prose.push_str(line);
                prose.push('\n');
            }
        }
    }
    assert!(open.is_none(), "a code block of the runbook is not closed");
    (blocks, prose)
}

/// The inline code spans of a text: a run of N backticks up to the next run of exactly N.
fn code_spans(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let run = |i: usize| b[i..].iter().take_while(|&&c| c == b'`').count();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'`' {
            i += 1;
            continue;
        }
        let n = run(i);
        let start = i + n;
        let mut j = start;
        let mut close = None;
        while j < b.len() {
            if b[j] == b'`' {
                let m = run(j);
                if m == n {
                    close = Some(j);
                    break;
                }
                j += m;
            } else {
                j += 1;
            }
        }
        match close {
            Some(j) => {
                spans.push(text[start..j].trim().to_string());
                i = j + n;
            }
            None => i = start,
        }
    }
    spans
}

fn is_sh(b: &Block) -> bool {
    b.info == "sh" || b.info.starts_with("sh ")
}

fn node_of(b: &Block) -> Option<&str> {
    b.info
        .split_whitespace()
        .find_map(|w| w.strip_prefix("node="))
}

/// The `blkrep ...` command lines in a piece of shell or inline code: the words after
/// `blkrep` up to the end of the simple command (a pipe, `;`, `&`, `)`, a redirection or
/// a comment).
fn blkrep_commands(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in code.lines() {
        let line = match line.find(" #") {
            Some(i) => &line[..i],
            None if line.trim_start().starts_with('#') => "",
            None => line,
        };
        let mut rest = line;
        while let Some(i) = rest.find("blkrep") {
            let before = rest[..i].chars().last();
            let after = rest[i + 6..].chars().next();
            let word_start = before.is_none_or(|c| " \t(`$|;&".contains(c));
            let word_end = after.is_none_or(|c| c == ' ' || c == '\t');
            rest = &rest[i + 6..];
            if !(word_start && word_end) {
                continue;
            }
            let end = rest
                .find(['|', ';', '&', ')', '>', '<'])
                .unwrap_or(rest.len());
            out.push(
                rest[..end]
                    .split_whitespace()
                    .map(|w| w.trim_matches(['\'', '"']).to_string())
                    .collect(),
            );
        }
    }
    out
}

/// `blkrep`'s verb (and the action of `baseline`) and the long flags it is given.
fn verb_and_flags(words: &[String]) -> (Vec<String>, BTreeSet<String>) {
    let mut verb: Vec<String> = Vec::new();
    let mut flags = BTreeSet::new();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        if matches!(w.as_str(), "-c" | "--config" | "-n" | "--node") && verb.is_empty() {
            it.next(); // its value
        } else if let Some(f) = w.strip_prefix("--") {
            flags.insert(format!("--{}", f.split('=').next().unwrap_or(f)));
        } else if w.starts_with('-') {
            // a short option: checked by running the command's --help below only as a word
        } else if verb.is_empty()
            || (verb.len() == 1 && matches!(verb[0].as_str(), "baseline" | "leg"))
        {
            verb.push(w.clone());
        }
    }
    (verb, flags)
}

#[test]
fn every_blkrep_command_in_the_runbook_exists() {
    let md = repo_file("docs/runbook.md");
    let (blocks, prose) = parse(&md);
    let mut commands: Vec<(String, Vec<String>)> = Vec::new();
    for b in blocks.iter().filter(|b| is_sh(b)) {
        for c in blkrep_commands(&b.text) {
            commands.push((format!("```{} block in \"{}\"", b.info, b.section), c));
        }
    }
    // Inline code spans, which may wrap across lines.
    for span in code_spans(&prose.replace('\n', " ")) {
        if span.starts_with("blkrep ") {
            for c in blkrep_commands(&span) {
                commands.push((format!("inline `{span}`"), c));
            }
        }
    }
    assert!(
        commands.len() >= 20,
        "only {} blkrep commands found in the runbook: is the parser right?",
        commands.len()
    );
    let bin = bin_dir().join("blkrep");
    let mut checked = BTreeSet::new();
    for (where_, words) in &commands {
        let (verb, flags) = verb_and_flags(words);
        assert!(
            !verb.is_empty(),
            "{where_}: `blkrep {}` names no subcommand",
            words.join(" ")
        );
        if !checked.insert((verb.clone(), flags.clone())) {
            continue;
        }
        let out = Command::new(&bin)
            .args(&verb)
            .arg("--help")
            .output()
            .expect("run blkrep --help");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{where_}: `blkrep {} --help` failed: `{}` is not a blkrep command\n{}",
            verb.join(" "),
            verb.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        for f in &flags {
            let known = help.match_indices(f.as_str()).any(|(i, _)| {
                help[i + f.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| !(c.is_alphanumeric() || c == '-'))
            });
            assert!(
                known,
                "{where_}: `blkrep {}` has no option {f}:\n{help}",
                verb.join(" ")
            );
        }
    }
    eprintln!(
        "{} blkrep commands in the runbook, {} distinct verb/flag sets checked",
        commands.len(),
        checked.len()
    );
}

#[test]
fn the_scenario_finds_what_it_runs() {
    let md = repo_file("docs/runbook.md");
    let (blocks, prose) = parse(&md);
    for section in ["Emergency takeover", "Failback"] {
        let sh: Vec<&Block> = blocks
            .iter()
            .filter(|b| b.section == section && is_sh(b))
            .collect();
        assert!(!sh.is_empty(), "no ```sh block in \"## {section}\"");
        for b in sh {
            assert!(
                matches!(node_of(b), Some("siteA" | "siteB")),
                "\"## {section}\": block ```{} must name node=siteA or node=siteB:\n{}",
                b.info,
                b.text
            );
        }
    }
    for b in blocks.iter().filter(|b| is_sh(b)) {
        assert!(
            matches!(node_of(b), Some("siteA" | "siteB" | "each")),
            "\"## {}\": block ```{} names no node (siteA, siteB or each)",
            b.section,
            b.info
        );
    }
    // The Drills section runs `blkrep drill` on the secondary.
    assert!(prose.contains("\n## Drills\n"), "a \"## Drills\" section");
    let drill_blocks: Vec<_> = blocks
        .iter()
        .filter(|b| b.section == "Drills" && is_sh(b))
        .collect();
    assert!(
        drill_blocks
            .iter()
            .any(|b| node_of(b) == Some("siteB") && b.text.contains("blkrep drill r0")),
        "the Drills section has no `blkrep drill r0` block on siteB"
    );
    // The VM scenario that runs the two sections is in the CI set.
    let scenario = repo_file("test-vm/scenarios/runbook.sh");
    assert!(
        scenario.lines().take(3).any(|l| l == "# vm-scenario: ci"),
        "test-vm/scenarios/runbook.sh is not marked `# vm-scenario: ci`"
    );
}

#[test]
fn the_markdown_reader_knows_fences_from_inline_code() {
    let (blocks, prose) = parse(
        "## A\n  ```` ```sh node=x ```` means x\n```sh node=siteB\nblkrep up r0\n```\n\
         ## B\n1. step:\n\n   ```sh node=each\n   blkrep status r0\n   ```\n",
    );
    assert_eq!(blocks.len(), 2);
    assert_eq!(
        (blocks[0].section.as_str(), blocks[0].info.as_str()),
        ("A", "sh node=siteB")
    );
    assert_eq!(blocks[1].text, "blkrep status r0\n");
    assert_eq!(code_spans(&prose), ["```sh node=x".to_string()], "{prose}");
    assert_eq!(
        code_spans("a `blkrep down\n r0` b ``x`y`` c"),
        ["blkrep down\n r0", "x`y"]
    );
}

#[test]
fn the_command_finder_sees_through_shell() {
    let c = blkrep_commands(
        "until blkrep status --json r0 | jq -e '.x' >/dev/null; do\n\
         blkrep check r0 || true   # exits 1\n\
         x=$(blkrep --node siteA baseline save --name b r0)\n\
         echo blkrep_lag_seconds; # blkrep nothing\n",
    );
    let v: Vec<_> = c.iter().map(|w| verb_and_flags(w)).collect();
    assert_eq!(v.len(), 3, "{c:?}");
    assert_eq!(v[0].0, ["status"]);
    assert!(v[0].1.contains("--json"));
    assert_eq!(v[1].0, ["check"]);
    assert_eq!(v[2].0, ["baseline", "save"]);
    assert!(v[2].1.contains("--name"));
}
