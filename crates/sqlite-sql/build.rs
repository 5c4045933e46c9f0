//! Where this crate's `query!` macros get their checked data: from `.sqlx/` beside this file
//! (committed), or — while `scripts/sqlx-prepare` runs, which sets `SQLX_PREPARE_SQLITE_URL` —
//! from a scratch SQLite database with `migrations/sqlite` applied, writing `.sqlx/` anew.
//! Whatever `DATABASE_URL` the environment holds is PostgreSQL's and never reaches this crate.

fn main() {
    println!("cargo:rerun-if-env-changed=SQLX_PREPARE_SQLITE_URL");
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it");
    match std::env::var("SQLX_PREPARE_SQLITE_URL") {
        Ok(url) if !url.is_empty() => {
            println!("cargo:rustc-env=SQLX_OFFLINE=false");
            println!("cargo:rustc-env=DATABASE_URL={url}");
            println!("cargo:rustc-env=SQLX_OFFLINE_DIR={manifest_dir}/.sqlx");
        }
        _ => {
            println!("cargo:rustc-env=SQLX_OFFLINE=true");
            println!("cargo:rustc-env=SQLX_OFFLINE_DIR={manifest_dir}/.sqlx");
        }
    }
}
