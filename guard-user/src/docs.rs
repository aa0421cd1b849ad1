//! `guard completions SHELL` and `guard man`: shell completions and man pages generated from
//! the CLI's own definition, so they cannot drift from what `guard --help` says. `cargo xtask
//! dist` runs both to fill the tarball and the .deb.

use std::io::Write;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    #[error("cannot write the {what}: {source}")]
    Write {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Writes the completion script for `shell` to `out`.
pub fn completions(cmd: &mut clap::Command, shell: Shell, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, cmd, name, out);
}

/// The man page of `cmd` alone (section 1), as roff.
pub fn man_page(cmd: clap::Command, out: &mut dyn Write) -> Result<(), DocsError> {
    clap_mangen::Man::new(cmd)
        .render(out)
        .map_err(|source| DocsError::Write {
            what: "man page".into(),
            source,
        })
}

/// One page per command and subcommand (`guard.1`, `guard-run.1`, ...) into `dir`; the paths
/// written, the top page first.
pub fn man_pages_to(cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, DocsError> {
    std::fs::create_dir_all(dir).map_err(|source| DocsError::Write {
        what: format!("folder {}", dir.display()),
        source,
    })?;
    let mut cmd = cmd;
    // Subcommand pages are named after their full path, which needs the built command.
    cmd.build();
    let mut written = Vec::new();
    render_tree(&cmd, dir, &mut written)?;
    Ok(written)
}

fn render_tree(
    cmd: &clap::Command,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), DocsError> {
    let man = clap_mangen::Man::new(cmd.clone());
    let path = dir.join(man.get_filename());
    let mut buf = Vec::new();
    man.render(&mut buf).map_err(|source| DocsError::Write {
        what: format!("man page {}", path.display()),
        source,
    })?;
    std::fs::write(&path, buf).map_err(|source| DocsError::Write {
        what: format!("man page {}", path.display()),
        source,
    })?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // clap's generated `help` subcommand has no page worth shipping.
        if sub.get_name() == "help" {
            continue;
        }
        render_tree(sub, dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> clap::Command {
        clap::Command::new("guard")
            .version("1.2.3")
            .about("sample")
            .subcommand(
                clap::Command::new("run")
                    .about("run it")
                    .arg(clap::Arg::new("iface").long("iface")),
            )
            .subcommand(clap::Command::new("status"))
    }

    #[test]
    fn every_shell_gets_a_script_naming_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completions(&mut sample(), shell, &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("status") && text.contains("iface"),
                "{shell}: {text}"
            );
        }
    }

    #[test]
    fn one_page_per_subcommand() {
        let dir = std::env::temp_dir().join(format!("guard-man-{}", std::process::id()));
        let pages = man_pages_to(sample(), &dir).unwrap();
        let names: Vec<_> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["guard.1", "guard-run.1", "guard-status.1"]);
        let run = std::fs::read_to_string(dir.join("guard-run.1")).unwrap();
        assert!(
            run.contains(".TH guard-run 1") && run.contains("iface"),
            "{run}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
