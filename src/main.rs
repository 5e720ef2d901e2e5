//! `apie-mcp`: see the library's documentation for the architecture.

fn main() {
    std::process::exit(i32::from(apie_mcp::main()));
}
