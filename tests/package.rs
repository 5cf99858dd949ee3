//! The Debian package that `cargo xtask deb` builds (and `cargo xtask test`
//! builds before the end-to-end tests): installed with dpkg on this host,
//! run from /usr/bin, its unit verified by systemd, removed without a trace.
mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use support::{ELF_64_BIT, EM_AARCH64, elf_class_and_machine, run, run_ok};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// target/debian/observer_<version>_<arch>.deb for this host's arch.
fn package() -> PathBuf {
    package_for(&run_ok(Command::new("dpkg").arg("--print-architecture")))
}

/// target/debian/observer_<version>_<arch>.deb.
fn package_for(arch: &str) -> PathBuf {
    let deb = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debian")
        .join(format!("observer_{VERSION}_{arch}.deb"));
    assert!(
        deb.exists(),
        "no {}: run `cargo xtask deb --arch {arch}` (cargo xtask test builds it)",
        deb.display()
    );
    deb
}

fn installed_status() -> String {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "observer"]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const FILES: &[&str] = &[
    "/usr/bin/observer",
    "/lib/systemd/system/observer.service",
    "/usr/share/man/man1/observer.1.gz",
    "/usr/share/doc/observer/copyright",
];

#[test]
fn the_package_holds_the_binary_unit_man_page_and_copyright() {
    let deb = package();
    let contents = run_ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for file in FILES {
        assert!(
            contents.contains(&format!(".{file}")),
            "{file} missing:\n{contents}"
        );
    }
    let info = run_ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(info.contains("Package: observer"), "{info}");
    assert!(info.contains(&format!("Version: {VERSION}")), "{info}");
    assert!(info.contains("Depends: libc6 (>= 2."), "{info}");

    // The man page, extracted (a slim Debian may exclude /usr/share/man on
    // install), renders every command's section without warnings.
    let dir = tempdir();
    run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir));
    let page = dir.join("usr/share/man/man1/observer.1.gz");
    let out = run(Command::new("man")
        .args(["--warnings", "-l"])
        .arg(&page)
        .env("MANWIDTH", "100")
        .env_remove("MAN_KEEP_FORMATTING"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "man -l: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).trim().is_empty(),
        "groff warnings: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for section in [
        "OBSERVER SERVE",
        "OBSERVER LISTENERS",
        "OBSERVER TRACE",
        "OBSERVER TOP",
        "OBSERVER DOCTOR",
    ] {
        assert!(
            text.contains(section),
            "no {section} in the man page:\n{text}"
        );
    }
    assert!(text.contains("--web.listen-address"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_package_installs_runs_from_usr_bin_and_removes_cleanly() {
    let deb = package();
    run_ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert_eq!(installed_status(), "install ok installed");

    let version = run_ok(Command::new("/usr/bin/observer").arg("--version"));
    assert_eq!(version.trim(), format!("observer {VERSION}"));
    let doctor = run_ok(Command::new("/usr/bin/observer").arg("doctor"));
    assert!(
        doctor.contains("observer serve can run on this host"),
        "{doctor}"
    );
    let unit = std::fs::read_to_string("/lib/systemd/system/observer.service").expect("unit");
    assert!(unit.contains("ExecStart=/usr/bin/observer serve"), "{unit}");
    run_ok(
        Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/observer.service"]),
    );

    run_ok(Command::new("dpkg").args(["-r", "observer"]));
    for file in FILES {
        assert!(!Path::new(file).exists(), "{file} left after dpkg -r");
    }
    run_ok(Command::new("dpkg").args(["-P", "observer"]));
    let status = installed_status();
    assert!(
        !status.contains("installed") || status.contains("not-installed"),
        "after purge: {status:?}"
    );
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("observer-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn the_arm64_package_holds_an_aarch64_binary_with_the_same_unit_and_man_page() {
    let (host, arm64) = (package(), package_for("arm64"));
    let field =
        |deb: &Path, name: &str| run_ok(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name));
    assert_eq!(field(&arm64, "Architecture"), "arm64");
    assert_eq!(field(&arm64, "Version"), VERSION);
    assert!(
        field(&arm64, "Depends").starts_with("libc6 (>= 2."),
        "{}",
        field(&arm64, "Depends")
    );
    let dir = tempdir();
    let (host_dir, arm64_dir) = (dir.join("host"), dir.join("arm64"));
    for (deb, to) in [(&host, &host_dir), (&arm64, &arm64_dir)] {
        run_ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(to));
    }
    assert_eq!(
        elf_class_and_machine(
            &std::fs::read(arm64_dir.join("usr/bin/observer")).expect("the binary")
        ),
        Some((ELF_64_BIT, EM_AARCH64)),
        "a 64-bit arm64 binary"
    );
    for file in FILES.iter().filter(|f| !f.ends_with("/observer")) {
        let read = |root: &Path| std::fs::read(root.join(file.trim_start_matches('/')));
        assert_eq!(
            read(&arm64_dir).ok(),
            read(&host_dir).ok(),
            "{file} is the same in both packages"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
