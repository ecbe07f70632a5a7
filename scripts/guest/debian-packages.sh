# shellcheck shell=bash
# debian-packages.sh: sourced by fetch-systemd and fetch-etcd (bash). Downloads Debian packages
# with the machine's own apt sources (apt-get download, never installed), unpacks them with
# dpkg-deb -x, and finds the libraries a set of binaries loads, fetching library packages round
# by round until every one resolves inside the download.
#
# The sourcing script defines log and die (printing its own name), and sets
#   work   a private temporary directory (the caller removes it)
# then calls deb_init. After that:
#   $x/PACKAGE        one package's files
#   $work/versions    "package version" of every package fetched
#   $work/bins        the binaries whose libraries deb_resolve looks for (written by the caller)
#   $work/libs        (after deb_resolve) "SONAME PATH" of every library they load
#   $work/used        (after deb_keep_libs) the packages a kept library came from

deb_init() {
    x="$work/x"
    mkdir -p "$x" "$work/debs"
    : > "$work/versions"
    fetched=""
}

# deb_candidate PACKAGE: its candidate version, empty if apt does not know it.
deb_candidate() {
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -v '^(none)$' | head -n 1
}

# deb_candidate_or_update PACKAGE: as deb_candidate, running apt-get update once if apt does not
# know the package (a machine whose package lists were never fetched).
deb_candidate_or_update() {
    local v
    v="$(deb_candidate "$1")"
    if [ -z "$v" ]; then
        log "$1 unknown to apt, running apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        v="$(deb_candidate "$1")"
    fi
    [ -n "$v" ] || die "apt knows no $1 package"
    printf '%s\n' "$v"
}

# deb_fetch PACKAGE[=VERSION]...: download and unpack each into $x/PACKAGE.
deb_fetch() {
    (
        cd "$work/debs"
        # Download as root without apt's _apt sandbox (it cannot write here).
        apt-get download -q -o APT::Sandbox::User=root "$@" >&2
    ) || die "apt-get download $* failed"
    local p deb
    for p in "$@"; do
        deb="$(find "$work/debs" -maxdepth 1 -name "${p%%=*}_*.deb" | head -n 1)"
        [ -n "$deb" ] || die "apt-get download ${p%%=*} produced no .deb"
        dpkg-deb -x "$deb" "$x/${p%%=*}" || die "dpkg-deb -x $deb failed"
        dpkg-deb -f "$deb" Package Version | awk '{ print $2 }' | paste -sd' ' >> "$work/versions"
        rm -f "$deb"
        fetched="$fetched ${p%%=*} "
    done
}

# deb_lib_deps PACKAGE...: their library dependencies (Depends/PreDepends named lib*) not yet
# fetched.
deb_lib_deps() {
    apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
        --no-enhances "$@" 2>/dev/null \
        | sed -n 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: \(lib[^ <>]*\)$/\2/p' | sort -u \
        | while read -r d; do
            case "$fetched" in *" $d "*) ;; *) echo "$d" ;; esac
        done
}

# deb_libs: every library the binaries in $work/bins load, as "SONAME PATH" (PATH empty when the
# download has none), through the downloaded loader (libc6's) with only the download's library
# directories (lib/x86_64-linux-gnu and, for systemd's RUNPATH, its systemd/ subdirectory).
deb_libs() {
    local ldso dirs d b
    ldso="$(find "$x" -path '*/x86_64-linux-gnu/ld-linux-x86-64.so.2' -type f | head -n 1)"
    [ -n "$ldso" ] || die "no ld-linux-x86-64.so.2 in the download (fetch libc6)"
    dirs=""
    for d in $(find "$x" -type d \( -path '*/lib/x86_64-linux-gnu' -o -path '*/lib/x86_64-linux-gnu/systemd' \) | sort); do
        dirs="${dirs:+$dirs:}$d"
    done
    # A library found nowhere makes the loader stop with "error while loading shared libraries:
    # NAME: ..." (on a machine that has it installed, it is listed from there instead): either
    # way it is missing from the download.
    while read -r b; do
        "$ldso" --inhibit-cache --library-path "$dirs" --list "$b" 2>&1 || true
    done < "$work/bins" | awk -v x="$x/" '
        /error while loading shared libraries: / {
            sub(/.*error while loading shared libraries: /, ""); sub(/:.*/, ""); print; next }
        $2 == "=>" && $3 == "not" { print $1; next }
        $2 == "=>" { if (index($3, x) == 1) print $1, $3; else print $1; next }' \
        | sort -u
}

# deb_resolve SEED...: fetch library packages until every library of $work/bins resolves inside
# the download ($work/libs). Each round fetches the library dependencies of the packages that
# provided a library so far, of the SEED packages and of the packages earlier rounds fetched (a
# loader that stopped at a missing library listed none of the others: nft stops at libnftnl,
# which libnftables needs, before it lists libnftables).
deb_resolve() {
    local round=1 missing used next rounds=""
    while :; do
        deb_libs > "$work/libs"
        missing="$(awk 'NF == 1 { print $1 }' "$work/libs" | paste -sd' ')"
        [ -z "$missing" ] && return 0
        used="$(awk 'NF == 2 { print $2 }' "$work/libs" | sed "s|^$x/||; s|/.*||" | sort -u)"
        # shellcheck disable=SC2086
        next="$(deb_lib_deps "$@" $used $rounds | paste -sd' ')"
        [ -n "$next" ] || die "no package provides: $missing"
        round=$((round + 1))
        [ "$round" -le 10 ] || die "still missing after 10 rounds: $missing"
        log "round $round: missing $missing; fetching $next"
        # shellcheck disable=SC2086
        deb_fetch $next
        rounds="$rounds $next"
    done
}

# deb_keep_libs ROOT: copy the libraries of $work/libs into ROOT/usr/lib/x86_64-linux-gnu, each
# as a file named by its soname (libsystemd-shared-* and libsystemd-core-* under systemd/, the
# RUNPATH of systemd's binaries), with the loader ld-linux-x86-64.so.2 and a link to it in
# ROOT/usr/lib64 (the binaries' program interpreter is /lib64/ld-linux-x86-64.so.2); records in
# $work/used which package each came from.
deb_keep_libs() {
    local root="$1" soname path dest ld
    mkdir -p "$root/usr/lib/x86_64-linux-gnu" "$root/usr/lib64"
    : > "$work/used"
    while read -r soname path; do
        case "$soname" in
            libsystemd-shared-*|libsystemd-core-*)
                mkdir -p "$root/usr/lib/x86_64-linux-gnu/systemd"
                dest="$root/usr/lib/x86_64-linux-gnu/systemd/$soname" ;;
            */*) dest="$root/usr/lib/x86_64-linux-gnu/${soname##*/}" ;;
            *) dest="$root/usr/lib/x86_64-linux-gnu/$soname" ;;
        esac
        cp -L "$path" "$dest"
        echo "${path#"$x/"}" | sed 's|/.*||' >> "$work/used"
    done < "$work/libs"
    ld="$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    [ -f "$ld" ] || cp -L "$(find "$x/libc6" -name ld-linux-x86-64.so.2 | head -n 1)" "$ld"
    ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root/usr/lib64/ld-linux-x86-64.so.2"
}

# deb_packages PACKAGE...: "package version" of the named packages and of every package a kept
# library came from, sorted.
deb_packages() {
    { printf '%s\n' "$@"; sort -u "$work/used"; } | sort -u \
        | while read -r p; do awk -v p="$p" '$1 == p' "$work/versions"; done
}

# deb_install_dir OUT NEW: replace the directory OUT with NEW.
deb_install_dir() {
    rm -rf "$1.old"
    [ -e "$1" ] && mv "$1" "$1.old"
    mv "$2" "$1"
    rm -rf "$1.old"
}
