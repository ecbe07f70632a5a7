//! The read-only store image (`--store-mode image`) built for real: drydock-vm's
//! `ensure_store_image` packs the closure of the test system (built into a chroot store of these
//! tests by `scripts/guest/build-test-system`) and a hand-made store of edge cases with
//! `mkfs.erofs`, through each staging strategy (a link farm, bind mounts in a private mount
//! namespace via `unshare`, a copy); the images are unpacked with `fsck.erofs` and compared with
//! the store, and loop-mounted by the kernel. Also: the cache, concurrent builders, a failing
//! `mkfs.erofs`, scratch left by a dead builder. What fails before any program runs is
//! unit-tested in `vm/src/image.rs`. Needs root (bind mounts, the loop mount).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use drydock_vm::{
    ImageError, ImageTools, Staging, StoreImage, closure_key, ensure_store_image,
    ensure_store_image_with, list_images,
};
use sha2::{Digest, Sha256};

use crate::common::is_root;
use crate::vmcommon::{self, build_system};

/// The project's test system in a chroot store (built once per test binary), a variant of it,
/// and a store path outside its closure.
struct Fixture {
    store: PathBuf,
    closure: Vec<String>,
    variant_closure: Vec<String>,
    outside: String,
}
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // A store of these tests' own under Cargo's target temporary directory, reused across
        // runs (building into it again is a no-op).
        let root =
            vmcommon::created(Path::new(env!("CARGO_TARGET_TMPDIR")).join("drydock-image-store"));
        let top = build_system(&root, &[]);
        let variant = build_system(&root, &["image-test"]);
        let outside = build_system(&root, &["--outside"]);
        let closure_of = |top: &str| -> Vec<String> {
            let out = Command::new("nix-store")
                .arg("--store")
                .arg(&root)
                .args(["-qR", top])
                .output()
                .expect("run nix-store");
            assert!(out.status.success(), "nix-store -qR {top}");
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|l| l.strip_prefix("/nix/store/").unwrap().to_owned())
                .collect()
        };
        Fixture {
            store: root.join("nix/store"),
            closure: closure_of(&top),
            variant_closure: closure_of(&variant),
            outside: outside.strip_prefix("/nix/store/").unwrap().to_owned(),
        }
    })
}
fn sha256_file(path: &Path) -> String {
    let digest = Sha256::digest(fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
fn names_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}
/// Unpack an image with erofs-utils' own checker (which also verifies it).
fn extract(image: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let st = Command::new("fsck.erofs")
        .arg(format!("--extract={}", out.display()))
        .arg(image)
        .status()
        .expect("run fsck.erofs");
    assert!(st.success(), "fsck.erofs --extract {}", image.display());
    dir
}
/// `a` and `b` are the same tree: types, permission bits, symlink targets, file contents.
fn assert_same_tree(a: &Path, b: &Path) {
    let ma = fs::symlink_metadata(a).unwrap();
    let mb = fs::symlink_metadata(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    assert_eq!(
        ma.file_type(),
        mb.file_type(),
        "{} vs {}",
        a.display(),
        b.display()
    );
    if ma.file_type().is_symlink() {
        assert_eq!(
            fs::read_link(a).unwrap(),
            fs::read_link(b).unwrap(),
            "{}",
            b.display()
        );
        return;
    }
    assert_eq!(
        ma.mode() & 0o7777,
        mb.mode() & 0o7777,
        "mode of {}",
        b.display()
    );
    if ma.is_dir() {
        assert_eq!(names_in(a), names_in(b), "entries of {}", b.display());
        for name in names_in(a) {
            assert_same_tree(&a.join(&name), &b.join(&name));
        }
    } else {
        assert!(
            fs::read(a).unwrap() == fs::read(b).unwrap(),
            "contents of {}",
            b.display()
        );
    }
}
fn assert_image_is(image: &Path, store: &Path, closure: &[String]) {
    let x = extract(image);
    let root = x.path().join("x");
    let want: BTreeSet<String> = closure.iter().cloned().collect();
    assert_eq!(
        names_in(&root),
        want,
        "the image's root is exactly the closure"
    );
    for name in closure {
        assert_same_tree(&store.join(name), &root.join(name));
    }
}
/// Names in an images directory other than finished images and the lock (scratch leftovers).
fn leftovers(images: &Path) -> Vec<String> {
    names_in(images)
        .into_iter()
        .filter(|n| n != ".lock" && !n.ends_with(".erofs"))
        .collect()
}
fn tools(force: Staging) -> ImageTools {
    ImageTools {
        force: Some(force),
        ..ImageTools::default()
    }
}
#[test]
fn image_holds_exactly_the_closure_and_a_second_call_is_a_cache_hit() {
    let f = fixture();
    let images = tempfile::tempdir().unwrap();
    let dir = images.path().join("images");
    let img = ensure_store_image(&f.store, &f.closure, &dir).unwrap();
    assert!(img.built);
    assert_eq!(img.key, closure_key(&f.closure));
    assert_eq!(img.path, dir.join(format!("{}.erofs", img.key)));
    let md = fs::metadata(&img.path).unwrap();
    assert_eq!(img.bytes, md.len());
    assert_eq!(md.mode() & 0o777, 0o444, "images are read-only");
    assert!(!f.closure.contains(&f.outside));
    assert_image_is(&img.path, &f.store, &f.closure);
    assert_eq!(
        leftovers(&dir),
        Vec::<String>::new(),
        "no scratch left behind"
    );

    let start = Instant::now();
    let again = ensure_store_image(&f.store, &f.closure, &dir).unwrap();
    let took = start.elapsed();
    assert!(!again.built, "second call is a cache hit");
    assert_eq!(
        (&again.path, &again.key, again.bytes),
        (&img.path, &img.key, img.bytes)
    );
    assert!(took < Duration::from_millis(500), "cache hit took {took:?}");
    let md2 = fs::metadata(&img.path).unwrap();
    assert_eq!(
        (md.ino(), md.mtime_nsec()),
        (md2.ino(), md2.mtime_nsec()),
        "not rebuilt"
    );

    let listed = list_images(&dir).unwrap();
    assert_eq!(listed, vec![again]);
}
#[test]
fn a_different_closure_gets_its_own_image_and_order_does_not_matter() {
    let f = fixture();
    let images = tempfile::tempdir().unwrap();
    let a = ensure_store_image(&f.store, &f.closure, images.path()).unwrap();
    let b = ensure_store_image(&f.store, &f.variant_closure, images.path()).unwrap();
    assert!(a.built && b.built);
    assert_ne!(a.key, b.key);
    assert_ne!(a.path, b.path);
    assert_image_is(&b.path, &f.store, &f.variant_closure);

    // Same set in another order, with a duplicate: same key, a cache hit.
    let mut shuffled = f.closure.clone();
    shuffled.reverse();
    shuffled.push(f.closure[0].clone());
    assert_eq!(closure_key(&shuffled), a.key);
    let again = ensure_store_image(&f.store, &shuffled, images.path()).unwrap();
    assert!(!again.built);
    assert_eq!(again.path, a.path);

    let mut keys: Vec<String> = list_images(images.path())
        .unwrap()
        .into_iter()
        .map(|i| i.key)
        .collect();
    let mut want = vec![a.key, b.key];
    want.sort();
    keys.sort();
    assert_eq!(keys, want);
}
#[test]
fn every_staging_strategy_gives_the_same_bytes() {
    let f = fixture();
    let mut hashes = Vec::new();
    for staging in [Staging::LinkFarm, Staging::BindMounts, Staging::Copy] {
        let images = tempfile::tempdir().unwrap();
        let img = ensure_store_image_with(&f.store, &f.closure, images.path(), &tools(staging))
            .unwrap_or_else(|e| panic!("{staging:?}: {e:?}"));
        assert!(img.built);
        assert_eq!(
            leftovers(images.path()),
            Vec::<String>::new(),
            "{staging:?}"
        );
        hashes.push((staging, sha256_file(&img.path)));
    }
    assert!(
        hashes.iter().all(|(_, h)| *h == hashes[0].1),
        "reproducible across strategies: {hashes:?}"
    );
}
/// A hand-made store with what the test system lacks: a store path that is a symlink, empty
/// files and directories, hard links, read-only and executable files, nested directories.
fn edge_store() -> (tempfile::TempDir, Vec<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let h = |c: char| std::iter::repeat_n(c, 32).collect::<String>();
    let dir_path = format!("{}-tree", h('1'));
    let link_path = format!("{}-link", h('2'));
    let file_path = format!("{}-file.sh", h('3'));
    let d = store.join(&dir_path);
    fs::create_dir_all(d.join("a/b/empty-dir")).unwrap();
    fs::write(d.join("a/b/data"), b"contents\n").unwrap();
    fs::write(d.join("a/empty"), b"").unwrap();
    fs::hard_link(d.join("a/b/data"), d.join("a/data-link")).unwrap();
    symlink("b/data", d.join("a/rel")).unwrap();
    symlink("/nix/store/dangling", d.join("dangling")).unwrap();
    fs::write(store.join(&file_path), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(store.join(&file_path), fs::Permissions::from_mode(0o555)).unwrap();
    symlink(&file_path, store.join(&link_path)).unwrap();
    fs::set_permissions(d.join("a/b/data"), fs::Permissions::from_mode(0o444)).unwrap();
    for sub in ["a/b/empty-dir", "a/b", "a", ""] {
        fs::set_permissions(d.join(sub), fs::Permissions::from_mode(0o555)).unwrap();
    }
    (tmp, vec![dir_path, link_path, file_path])
}
#[test]
fn edge_cases_survive_every_strategy() {
    let (tmp, closure) = edge_store();
    let store = tmp.path().join("store");
    let mut hashes = BTreeSet::new();
    for staging in [Staging::LinkFarm, Staging::BindMounts, Staging::Copy] {
        let images = tempfile::tempdir().unwrap();
        let img = ensure_store_image_with(&store, &closure, images.path(), &tools(staging))
            .unwrap_or_else(|e| panic!("{staging:?}: {e:?}"));
        assert_image_is(&img.path, &store, &closure);
        assert_eq!(
            leftovers(images.path()),
            Vec::<String>::new(),
            "{staging:?}"
        );
        hashes.insert(sha256_file(&img.path));
    }
    assert_eq!(hashes.len(), 1, "identical images");
    // The link farm must not have touched the store's modes (it only links files).
    let data = store.join(&closure[0]).join("a/b/data");
    assert_eq!(fs::metadata(&data).unwrap().mode() & 0o777, 0o444);
    assert_eq!(
        fs::metadata(&data).unwrap().nlink(),
        2,
        "farm links are gone again"
    );
    for dir in ["a/b/empty-dir", "a/b", "a", ""] {
        let m = fs::metadata(store.join(&closure[0]).join(dir))
            .unwrap()
            .mode();
        assert_eq!(m & 0o777, 0o555, "{dir}");
    }
    make_removable(&store, &closure);
}
/// The consumer is the kernel: mount the image read-only through a loop device (needs root,
/// which these tests have) and check what the guest will see, hard links included.
#[test]
fn the_kernel_mounts_the_image() {
    assert!(is_root(), "this test loop-mounts and needs root");
    let (tmp, closure) = edge_store();
    let store = tmp.path().join("store");
    let images = tempfile::tempdir().unwrap();
    let img = ensure_store_image(&store, &closure, images.path()).unwrap();
    let mnt = images.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-o", "loop,ro", "-t", "erofs"])
        .arg(&img.path)
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success(), "mount -t erofs");
    struct Umount<'a>(&'a Path);
    impl Drop for Umount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Umount(&mnt);
    let want: BTreeSet<String> = closure.iter().cloned().collect();
    assert_eq!(names_in(&mnt), want);
    for name in &closure {
        assert_same_tree(&store.join(name), &mnt.join(name));
    }
    let a = fs::metadata(mnt.join(&closure[0]).join("a/b/data")).unwrap();
    let b = fs::metadata(mnt.join(&closure[0]).join("a/data-link")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard link kept");
    assert_eq!(a.uid(), 0);
    assert_eq!(a.mtime(), 0, "fixed timestamps");
    make_removable(&store, &closure);
}
/// Make the hand-made store removable again (its directories are read-only, as in Nix).
fn make_removable(store: &Path, closure: &[String]) {
    for dir in ["a/b/empty-dir", "a/b", "a", ""] {
        fs::set_permissions(
            store.join(&closure[0]).join(dir),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
}
#[test]
fn concurrent_builders_of_one_key_share_one_build() {
    let f = fixture();
    let images = tempfile::tempdir().unwrap();
    let dir = Arc::new(images.path().join("images"));
    let n = 4;
    let barrier = Arc::new(Barrier::new(n));
    let results: Vec<StoreImage> = (0..n)
        .map(|_| {
            let (dir, barrier) = (dir.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                ensure_store_image(&fixture().store, &fixture().closure, &dir)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert_eq!(results.iter().filter(|r| r.built).count(), 1, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| r.path == results[0].path && r.bytes == results[0].bytes)
    );
    assert_eq!(list_images(&dir).unwrap().len(), 1);
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    // And it is the same image a lone builder makes.
    let lone = tempfile::tempdir().unwrap();
    let l = ensure_store_image(&f.store, &f.closure, lone.path()).unwrap();
    assert_eq!(sha256_file(&l.path), sha256_file(&results[0].path));
}
#[test]
fn a_failing_mkfs_is_reported_with_its_stderr_and_leaves_nothing() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("mkfs.erofs");
    fs::write(&fake, "#!/bin/sh\necho 'disk on fire' >&2\nexit 3\n").unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let images = tmp.path().join("images");
    for staging in [Staging::LinkFarm, Staging::BindMounts] {
        let tools = ImageTools {
            mkfs: fake.clone().into(),
            force: Some(staging),
            ..ImageTools::default()
        };
        let err = ensure_store_image_with(&f.store, &f.closure, &images, &tools).unwrap_err();
        match &err {
            ImageError::ToolFailed { status, stderr, .. } => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr, "disk on fire");
            }
            other => panic!("{staging:?}: {other:?}"),
        }
        assert!(!err.is_bad_input());
        assert!(list_images(&images).unwrap().is_empty());
        assert_eq!(leftovers(&images), Vec::<String>::new(), "{staging:?}");
    }
}
#[test]
fn scratch_of_a_dead_builder_is_swept_by_the_next_build() {
    let f = fixture();
    let images = tempfile::tempdir().unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let key = closure_key(&f.variant_closure);
    let stage = images.path().join(format!(".{key}.stage-{dead}-0"));
    fs::create_dir_all(stage.join("x/y")).unwrap();
    fs::set_permissions(stage.join("x"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::write(
        images.path().join(format!(".{key}.tmp-{dead}-0")),
        b"partial",
    )
    .unwrap();
    let alive = images.path().join(format!(".{key}.tmp-1-0")); // pid 1 is alive
    fs::write(&alive, b"").unwrap();
    ensure_store_image(&f.store, &f.closure, images.path()).unwrap();
    assert_eq!(leftovers(images.path()), vec![format!(".{key}.tmp-1-0")]);
}
