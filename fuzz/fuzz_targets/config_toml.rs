//! Configuration files: any text is either a valid configuration or an error naming keys.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = scalechat::config::from_toml(text) {
        assert!(config.validate().is_empty());
        // What check-config prints reads back as the same configuration (secrets print
        // masked, so only without them).
        let secrets = !config.redis.password.expose().is_empty()
            || !config.auth.jwt_secret.expose().is_empty();
        if !secrets {
            let again = scalechat::config::from_toml(&config.to_toml());
            assert_eq!(again.ok(), Some(config));
        }
    }
});
