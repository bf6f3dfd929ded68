//! Stand-in `/init` for tests until the main binary dispatches to the appliance init
//! itself (when started as `init`): it does nothing but call it.

fn main() {
    mkappliance::appliance::init::run()
}
