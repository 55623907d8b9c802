//! Destination checks (SSRF guard). A target must be an https URL of a
//! globally routable host. Literal addresses are checked when a webhook is
//! saved and again before each request; names are checked after resolution,
//! at connect time, so DNS cannot smuggle in a private address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use url::{Host, Url};

/// Appended to every refusal that `delivery.allow_private_targets` lifts.
pub const ALLOW_PRIVATE_HINT: &str =
    "; set delivery.allow_private_targets = true to allow it for local testing";

/// Checks a target URL as stored on a webhook. `allow_private` also admits
/// plain http and non-global destinations.
pub fn check_target_url(raw: &str, allow_private: bool) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("not an absolute URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_private => {}
        "http" => return Err(format!("must use https{ALLOW_PRIVATE_HINT}")),
        other => return Err(format!("unsupported scheme {other:?}; use https")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials; use auth.basic instead".into());
    }
    match url.host() {
        None => return Err("has no host".into()),
        Some(Host::Ipv4(ip)) => check_ip(IpAddr::V4(ip), allow_private)?,
        Some(Host::Ipv6(ip)) => check_ip(IpAddr::V6(ip), allow_private)?,
        Some(Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if !allow_private && (name == "localhost" || name.ends_with(".localhost")) {
                return Err(format!("targets a loopback host{ALLOW_PRIVATE_HINT}"));
            }
        }
    }
    Ok(url)
}

/// A target URL as logs and attempt errors may show it: scheme, host, port
/// and path, without credentials, query string or fragment (where tokens
/// tend to live).
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        // A relative reference (a redirect's `Location: /elsewhere?t=…`).
        Err(_) => raw.split(['?', '#']).next().unwrap_or_default().to_string(),
    }
}

/// Refuses `ip` unless it is globally routable or `allow_private` is set.
pub fn check_ip(ip: IpAddr, allow_private: bool) -> Result<(), String> {
    if allow_private || is_global(ip) {
        Ok(())
    } else {
        Err(format!(
            "targets a non-global address ({ip}){ALLOW_PRIVATE_HINT}"
        ))
    }
}

/// Keeps the resolved addresses a request may connect to.
pub fn filter_resolved(
    addrs: Vec<SocketAddr>,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, String> {
    let total = addrs.len();
    let kept: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| allow_private || is_global(a.ip()))
        .collect();
    if kept.is_empty() {
        if total == 0 {
            Err("name resolved to no address".into())
        } else {
            Err(format!(
                "name resolves only to non-global addresses{ALLOW_PRIVATE_HINT}"
            ))
        }
    } else {
        Ok(kept)
    }
}

/// Whether `ip` is a public unicast address.
pub fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_global_v4(v4),
        IpAddr::V6(v6) => is_global_v6(v6),
    }
}

fn is_global_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

fn is_global_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_global_v4(v4);
    }
    let seg = ip.segments();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return false;
    }
    match seg[0] {
        0x0000 => false, // IPv4-compatible and other reserved
        0x0064 if seg[1] == 0xff9b => {
            // NAT64: judge the embedded IPv4 address.
            is_global_v4(Ipv4Addr::new(
                (seg[6] >> 8) as u8,
                seg[6] as u8,
                (seg[7] >> 8) as u8,
                seg[7] as u8,
            ))
        }
        0x0100 => false,                     // discard-only
        0x2001 if seg[1] < 0x0200 => false,  // Teredo, benchmarking, ORCHID...
        0x2001 if seg[1] == 0x0db8 => false, // documentation
        0x2002 => is_global_v4(Ipv4Addr::new(
            // 6to4: the embedded address
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        )),
        s if s & 0xfe00 == 0xfc00 => false, // unique local
        s if s & 0xffc0 == 0xfe80 => false, // link-local
        s if s & 0xffc0 == 0xfec0 => false, // site-local (deprecated)
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_global_targets() {
        for url in [
            "https://127.0.0.1/x",
            "https://10.1.2.3/",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[fe80::1]/",
            "https://[fd00::1]/",
            "https://2130706433/", // decimal 127.0.0.1
            "https://0x7f.0.0.1/", // hex
            "https://0177.0.0.1/", // octal
            "https://localhost/",
            "https://api.localhost./",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
        ] {
            assert!(
                check_target_url(url, false).is_err(),
                "{url} should be refused"
            );
        }
    }

    #[test]
    fn accepts_public_https() {
        for url in [
            "https://example.com/hooks?x=1",
            "https://93.184.216.34/",
            "https://[2606:2800:220:1:248:1893:25c8:1946]/",
        ] {
            assert!(check_target_url(url, false).is_ok(), "{url} should pass");
        }
    }

    #[test]
    fn scheme_and_credentials_rules() {
        assert!(check_target_url("http://example.com/", false)
            .unwrap_err()
            .contains("https"));
        assert!(check_target_url("ftp://example.com/", true).is_err());
        assert!(check_target_url("https://u:p@example.com/", false)
            .unwrap_err()
            .contains("credentials"));
        assert!(check_target_url("/relative", true).is_err());
        assert!(check_target_url("http://127.0.0.1:8080/", true).is_ok());
    }

    #[test]
    fn refusals_point_at_allow_private_targets() {
        for url in [
            "http://example.com/",
            "https://localhost/",
            "https://127.0.0.1/",
            "https://[::1]/",
            "https://10.0.0.1/",
        ] {
            let e = check_target_url(url, false).unwrap_err();
            assert!(
                e.ends_with(
                    "; set delivery.allow_private_targets = true to allow it for local testing"
                ),
                "{url}: {e}"
            );
        }
        let private = "10.0.0.1:443".parse().unwrap();
        let e = filter_resolved(vec![private], false).unwrap_err();
        assert!(e.contains("delivery.allow_private_targets"), "{e}");
        // Refusals the setting does not lift do not mention it.
        let e = check_target_url("ftp://example.com/", false).unwrap_err();
        assert!(!e.contains("allow_private_targets"), "{e}");
    }

    #[test]
    fn redacted_urls_keep_no_secrets() {
        assert_eq!(
            redact_url("https://u:p@example.com:8443/hook?token=s3cret#frag"),
            "https://example.com:8443/hook"
        );
        assert_eq!(redact_url("/moved?sig=abc"), "/moved");
    }

    #[test]
    fn resolved_addresses_are_filtered() {
        let private: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let public: SocketAddr = "93.184.216.34:443".parse().unwrap();
        assert!(filter_resolved(vec![private], false).is_err());
        assert_eq!(
            filter_resolved(vec![private, public], false).unwrap(),
            vec![public]
        );
        assert_eq!(filter_resolved(vec![private], true).unwrap(), vec![private]);
    }
}
