// Relink when the linker script changes (it is passed through RUSTFLAGS by build.sh).
fn main() {
    println!("cargo:rerun-if-changed=linker.ld");
}
