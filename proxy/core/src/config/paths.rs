//! Path normalisation before validation: relative paths in the file are
//! resolved against the config file's directory, and `.`/`..` are removed as text
//! (the filesystem is never consulted).

use std::path::{Component, Path, PathBuf};

use super::Config;

/// Absolute directory that relative paths in the file are resolved against.
pub(super) fn base_dir(origin: &Path) -> PathBuf {
    let parent = origin.parent().map(Path::to_path_buf).unwrap_or_default();
    let parent = if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent
    };
    if parent.is_absolute() {
        return lexical_normalise(&parent);
    }
    match std::env::current_dir() {
        Ok(cwd) => lexical_normalise(&cwd.join(parent)),
        Err(_) => lexical_normalise(&parent),
    }
}

/// Drop `.` and resolve `..` as text, without looking at the filesystem.
fn lexical_normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => out.push(component.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir) | Some(Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            Component::Normal(name) => out.push(name),
        }
    }
    out
}

fn resolve(base: &Path, path: &mut PathBuf) {
    if path.as_os_str().is_empty() {
        return; // reported as an error by validation
    }
    let joined = if path.is_absolute() {
        path.clone()
    } else {
        base.join(&*path)
    };
    *path = lexical_normalise(&joined);
}

/// Resolve relative paths and tidy values before validation.
pub(super) fn normalise(config: &mut Config, base: &Path) {
    let paths = [
        config.data_dir.as_mut(),
        config.admin.socket.as_mut(),
        config.identity.workload_api_socket.as_mut(),
        config.store.password_file.as_mut(),
        config.store.ca_file.as_mut(),
    ];
    for path in paths.into_iter().flatten() {
        resolve(base, path);
    }
    for route in &mut config.routes {
        if let Some(path) = route.unix_socket.as_mut() {
            resolve(base, path);
        }
        if let Some(path) = route.upstream_tls.ca_file.as_mut() {
            resolve(base, path);
        }
    }
    for sink in &mut config.export.sinks {
        if let Some(path) = sink.path.as_mut() {
            resolve(base, path);
        }
        if let Some(path) = sink.socket.as_mut() {
            resolve(base, path);
        }
        for value in sink.headers.values_mut() {
            if let super::HeaderValue::File(path) = value {
                resolve(base, path);
            }
        }
    }
    for workload in &mut config.workloads {
        if let Some(sha) = workload.selectors.exe_sha256.as_mut() {
            *sha = sha.to_ascii_lowercase();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::lexical_normalise;
    use crate::config::parse_str;

    #[test]
    fn relative_data_dir_resolves_against_config_dir() {
        let c = parse_str(
            "data_dir = \"state\"\n",
            Path::new("/opt/warden/conf/warden.toml"),
        )
        .unwrap();
        assert_eq!(c.data_dir, Some(PathBuf::from("/opt/warden/conf/state")));
        let c = parse_str(
            "data_dir = \"../state/./x\"\n",
            Path::new("/opt/warden/conf/warden.toml"),
        )
        .unwrap();
        assert_eq!(c.data_dir, Some(PathBuf::from("/opt/warden/state/x")));
        let c = parse_str(
            "data_dir = \"/abs\"\n",
            Path::new("/opt/warden/conf/warden.toml"),
        )
        .unwrap();
        assert_eq!(c.data_dir, Some(PathBuf::from("/abs")));
        // A relative origin is taken relative to the current directory.
        let c = parse_str("data_dir = \"state\"\n", Path::new("warden.toml")).unwrap();
        let expected = std::env::current_dir().unwrap().join("state");
        assert_eq!(c.data_dir, Some(lexical_normalise(&expected)));
        let c = parse_str(
            "[identity]\nworkload_api_socket = \"w.sock\"\n",
            Path::new("/a/b/c.toml"),
        )
        .unwrap();
        assert_eq!(
            c.identity.workload_api_socket,
            Some(PathBuf::from("/a/b/w.sock"))
        );
    }
}
