//! Config files as an operator might mistype them: parsed with unknown fields refused, then
//! validated. Neither may panic.
#![no_main]

use dongbo_connectors::config_file::Validate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = toml::from_str::<dongbo_hub::config::HubConfig>(text) {
        let _ = c.validate();
    }
    if let Ok(c) = toml::from_str::<dongbo_agent::config::AgentConfig>(text) {
        let _ = c.validate();
    }
});
