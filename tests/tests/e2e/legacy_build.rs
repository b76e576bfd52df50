//! The legacy agent (`deploy/build-legacy.sh`: glibc 2.17, no Kafka transport), as the old servers of
//! the provinces run it: the binary needs no glibc symbol newer than 2.17, says plainly that it has
//! no Kafka transport, and carries the Postgres scenario (snapshot, streaming over mutual TLS, a
//! `kill -9` inside a large transaction) with the NDC equal to the source and every change applied
//! once.

use std::path::PathBuf;
use std::time::Duration;

use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::workload::{big_insert_txn, mixed_small_txns};
use dongbo_tests::Deployment;

/// The legacy agent, built by `deploy/build-legacy.sh` (which `.ci/run` calls first).
fn legacy_agent() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/legacy/dongbo-agent");
    anyhow::ensure!(path.is_file(), "{} is missing: run ./deploy/build-legacy.sh first", path.display());
    Ok(path)
}

/// The highest `GLIBC_x.y` version among the dynamic symbols `objdump -T` lists.
fn highest_glibc(exe: &std::path::Path) -> anyhow::Result<(u32, u32)> {
    let out = std::process::Command::new("objdump").arg("-T").arg(exe).output()?;
    anyhow::ensure!(out.status.success(), "objdump -T failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let versions = text.split(|c: char| c.is_whitespace() || c == '(' || c == ')').filter_map(|w| {
        let (major, minor) = w.strip_prefix("GLIBC_")?.split_once('.')?;
        let minor = minor.split('.').next()?;
        Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?))
    });
    versions.max().ok_or_else(|| anyhow::anyhow!("no GLIBC_ symbol versions in {}", exe.display()))
}

#[test]
fn the_legacy_agent_needs_nothing_newer_than_glibc_2_17_and_refuses_kafka_plainly() -> anyhow::Result<()> {
    let exe = legacy_agent()?;
    let (major, minor) = highest_glibc(&exe)?;
    assert!((major, minor) <= (2, 17), "the legacy agent needs GLIBC_{major}.{minor}");
    // The normal build is the control: the reading works (it needs a newer glibc here).
    let normal = highest_glibc(&dongbo_tests::procs::binary("dongbo-agent")?)?;
    assert!(normal > (2, 17), "the normal build reads as {normal:?}: is the reading broken?");
    let dir = tempfile_dir()?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "source_id = \"old\"\n[source]\nkind = \"postgres\"\nhost = \"127.0.0.1\"\ndatabase = \"x\"\nuser = \"u\"\n\
             tables = [\"public.t\"]\n[spool]\npath = \"{}\"\n[kafka]\nbrokers = \"127.0.0.1:9092\"\ninsecure_plaintext_demo = true\n",
            dir.join("spool").display()
        ),
    )?;
    let out = std::process::Command::new(&exe).args(["run", "--config"]).arg(&config).output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("without the Kafka transport"), "{said}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("dongbo-legacy-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_agent_carries_the_postgres_scenario_exactly_once() -> anyhow::Result<()> {
    let mut d = Deployment::new("legacy", CITIZENS_DDL, &["public.citizens"]).await?;
    d.agent_binary = Some(legacy_agent()?);
    d.tls = Some(dongbo_tests::tls::TestPki::new(&d.dir.join("pki"))?);
    let src = d.source().await?;
    let mut gen = CitizenGen::new(17);
    let mut ids = insert_citizens(&src, &mut gen, 2_000).await?;
    let mut changes = 1 + 2_000u64;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    let writer = d.source().await?;
    let big = tokio::spawn(async move { big_insert_txn(&writer, 870_000_000_000, 20_000).await });
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 30).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.agent.as_mut().expect("agent").kill9();
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 20).await?;
    changes += big.await??;
    d.start_agent()?;
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 20).await?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(180)).await?;
    d.wait_applied(changes as i64, Duration::from_secs(30)).await?;
    Ok(())
}

/// Runs `program args` and returns its standard output, failing with its standard error.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program).args(args).output()?;
    anyhow::ensure!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What an unpacked package must hold: the agent that runs, its unit pointing at it, the example
/// config, the spool directory.
fn assert_installed_tree(root: &std::path::Path, exe: &std::path::Path) -> anyhow::Result<()> {
    let agent = root.join("usr/bin/dongbo-agent");
    assert_eq!(std::fs::read(&agent)?, std::fs::read(exe)?, "the packaged agent is the legacy build");
    assert!(run(&agent.to_string_lossy(), &["--help"])?.contains("dongbo hub"));
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/dongbo-agent.service"))?;
    assert!(unit.contains("ExecStart=/usr/bin/dongbo-agent run --config /etc/dongbo/agent.toml"), "{unit}");
    assert!(!unit.contains("/usr/local/"), "{unit}");
    let example =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/agent.toml"))?;
    assert_eq!(std::fs::read_to_string(root.join("etc/dongbo/agent.toml"))?, example);
    assert!(root.join("var/lib/dongbo").is_dir());
    Ok(())
}

#[test]
fn the_deb_and_the_rpm_unpack_into_a_throw_away_root_with_the_agent_its_unit_and_config() -> anyhow::Result<()> {
    let exe = legacy_agent()?;
    let dir = exe.parent().expect("target/legacy").to_path_buf();
    let version = env!("CARGO_PKG_VERSION");
    let deb = dir.join(format!("dongbo-agent_{version}_amd64.deb"));
    let rpm = dir.join(format!("dongbo-agent-{version}-1.x86_64.rpm"));
    anyhow::ensure!(deb.is_file() && rpm.is_file(), "packages missing: run ./deploy/package-legacy.sh first");
    let scratch = tempfile_dir()?;

    let deb_s = deb.to_string_lossy();
    assert_eq!(run("dpkg-deb", &["-f", &deb_s, "Package"])?.trim(), "dongbo-agent");
    assert!(run("dpkg-deb", &["-f", &deb_s, "Depends"])?.contains("libc6 (>= 2.17)"));
    let root = scratch.join("deb-root");
    run("dpkg-deb", &["-x", &deb_s, &root.to_string_lossy()])?;
    assert_installed_tree(&root, &exe)?;
    let control = scratch.join("deb-control");
    run("dpkg-deb", &["-e", &deb_s, &control.to_string_lossy()])?;
    assert_eq!(std::fs::read_to_string(control.join("conffiles"))?.trim(), "/etc/dongbo/agent.toml");
    assert!(std::fs::read_to_string(control.join("postinst"))?.contains("useradd --system"));

    let rpm_s = rpm.to_string_lossy();
    assert_eq!(run("rpm", &["-qp", "--qf", "%{NAME} %{VERSION}", &rpm_s])?.trim(), format!("dongbo-agent {version}"));
    assert_eq!(run("rpm", &["-qpc", &rpm_s])?.trim(), "/etc/dongbo/agent.toml", "agent.toml is kept on upgrade");
    assert!(run("rpm", &["-qp", "--scripts", &rpm_s])?.contains("useradd --system"));
    let root = scratch.join("rpm-root");
    std::fs::create_dir_all(&root)?;
    let unpacked = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("rpm2cpio '{rpm_s}' | cpio -idm --quiet"))
        .current_dir(&root)
        .status()?;
    assert!(unpacked.success());
    assert_installed_tree(&root, &exe)?;
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}
