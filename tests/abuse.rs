//! Abuse limits at the upgrade: connections and connection attempts per client address
//! (behind trusted proxies only), and signed-token authentication that fixes the user name.

mod common;

use common::{Client, TestServer, config, start};
use jsonwebtoken::{EncodingKey, Header};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Request;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

/// The status of an upgrade request to `/ws?query` with `headers`; 101 means upgraded (the
/// connection is returned to keep it open).
async fn upgrade(
    server: &TestServer,
    query: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Option<Client>) {
    let mut request: Request<()> = server.url(query).into_client_request().unwrap();
    for (k, v) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes());
        request
            .headers_mut()
            .insert(name.unwrap(), v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, response)) => (
            response.status().as_u16(),
            String::new(),
            Some(Client {
                ws,
                name: String::new(),
            }),
        ),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default());
            (response.status().as_u16(), body.into_owned(), None)
        }
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

#[tokio::test]
async fn an_address_may_hold_only_so_many_connections() {
    let mut cfg = config();
    cfg.server.max_connections_per_ip = 2;
    cfg.server.trusted_proxies = vec!["127.0.0.1".into()];
    let server = start(cfg).await;
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    let (s1, _, c1) = upgrade(&server, "", &from("203.0.113.7")).await;
    let (s2, _, _c2) = upgrade(&server, "", &from("203.0.113.7")).await;
    assert_eq!((s1, s2), (101, 101));
    let (s3, body, _) = upgrade(&server, "", &from("203.0.113.7")).await;
    assert_eq!(s3, 429, "{body}");
    assert!(body.contains("too many connections"), "{body}");
    // Another client behind the same proxy is counted on its own.
    assert_eq!(upgrade(&server, "", &from("203.0.113.8")).await.0, 101);
    // A closed connection frees its slot.
    drop(c1);
    let node = server.node.clone();
    common::eventually("the slots are released", || node.connections() == 1).await;
    assert_eq!(upgrade(&server, "", &from("203.0.113.7")).await.0, 101);
}

#[tokio::test]
async fn forwarded_addresses_from_untrusted_peers_are_ignored() {
    let mut cfg = config();
    cfg.server.max_connections_per_ip = 1;
    let server = start(cfg).await;
    let (first, _, _keep) = upgrade(&server, "", &[("x-forwarded-for", "198.51.100.1")]).await;
    assert_eq!(first, 101);
    // No trusted proxies: both count as 127.0.0.1, whatever the header claims.
    let (second, _, _) = upgrade(&server, "", &[("x-forwarded-for", "198.51.100.2")]).await;
    assert_eq!(second, 429);
}

#[tokio::test]
async fn one_ipv6_64_is_one_client_and_forged_hops_do_not_hide_it() {
    let mut cfg = config();
    cfg.server.max_connections_per_ip = 1;
    cfg.server.trusted_proxies = vec!["127.0.0.1".into()];
    let server = start(cfg).await;
    let from = |xff: &'static str| [("x-forwarded-for", xff)];
    let (first, _, _keep) = upgrade(&server, "", &from("2001:db8:5:6::1")).await;
    assert_eq!(first, 101);
    // Another address of the same /64, behind a forged hop the client wrote itself.
    let (second, body, _) = upgrade(&server, "", &from("garbage, 2001:db8:5:6::ffff")).await;
    assert_eq!(second, 429, "{body}");
    // Another /64 is another client.
    let (other, _, _keep) = upgrade(&server, "", &from("2001:db8:5:7::1")).await;
    assert_eq!(other, 101);
}

#[tokio::test]
async fn ipv6_prefix_len_128_counts_each_address() {
    let mut cfg = config();
    cfg.server.max_connections_per_ip = 1;
    cfg.server.trusted_proxies = vec!["127.0.0.1".into()];
    cfg.server.ipv6_prefix_len = 128;
    let server = start(cfg).await;
    let from = |xff: &'static str| [("x-forwarded-for", xff)];
    let (first, _, _keep) = upgrade(&server, "", &from("2001:db8:5:6::1")).await;
    let (second, _, _keep) = upgrade(&server, "", &from("2001:db8:5:6::2")).await;
    assert_eq!((first, second), (101, 101));
}

#[tokio::test]
async fn connecting_too_fast_is_refused_with_retry_after() {
    let mut cfg = config();
    cfg.server.connects_per_ip_per_second = 0.001;
    cfg.server.connect_burst_per_ip = 3;
    let server = start(cfg).await;
    let mut kept = Vec::new();
    for _ in 0..3 {
        let (status, _, c) = upgrade(&server, "", &[]).await;
        assert_eq!(status, 101);
        kept.push(c);
    }
    let (status, body, _) = upgrade(&server, "", &[]).await;
    assert_eq!(status, 429);
    assert!(body.contains("too fast"), "{body}");
    let (_, text) = common::http_get(server.addr, "/metrics", &[]).await;
    assert!(
        text.contains(r#"scalechat_connections_refused_total{reason="per_ip"} 1"#),
        "{text}"
    );
}

fn token(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn in_an_hour() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

#[tokio::test]
async fn with_a_secret_only_valid_tokens_connect_and_they_fix_the_name() {
    let mut cfg = config();
    cfg.auth.jwt_secret = SECRET.into();
    let server = start(cfg).await;
    let valid = token(serde_json::json!({"name":"carol","exp":in_an_hour()}));
    // The token's name wins over the query's.
    let (status, _, client) = upgrade(&server, &format!("name=mallory&token={valid}"), &[]).await;
    assert_eq!(status, 101);
    let mut client = client.unwrap();
    assert_eq!(client.expect("welcome").await["name"], "carol");
    // The cookie works too, and `sub` names the user when `name` is absent.
    let by_sub = token(serde_json::json!({"sub":"dave","exp":in_an_hour()}));
    let cookie = format!("theme=dark; scalechat_token={by_sub}");
    let (status, _, client) = upgrade(&server, "", &[("cookie", &cookie)]).await;
    assert_eq!(status, 101);
    assert_eq!(client.unwrap().expect("welcome").await["name"], "dave");

    let expired = token(serde_json::json!({"name":"carol","exp":1_000_000_000u64}));
    let no_exp = token(serde_json::json!({"name":"carol"}));
    let forged = jsonwebtoken::encode(
        &Header::default(),
        &serde_json::json!({"name":"carol","exp":in_an_hour()}),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-xx"),
    )
    .unwrap();
    for (query, why) in [
        ("name=carol".to_owned(), "required"),
        (format!("token={expired}"), "Expired"),
        (format!("token={no_exp}"), "exp"),
        (format!("token={forged}"), "InvalidSignature"),
        ("token=garbage".to_owned(), "invalid token"),
    ] {
        let (status, body, _) = upgrade(&server, &query, &[]).await;
        assert_eq!(status, 401, "{query}: {body}");
        assert!(body.contains(why), "{query}: {body}");
    }
}

#[tokio::test]
async fn the_token_cookie_is_accepted_only_from_this_site_and_listed_origins() {
    let mut cfg = config();
    cfg.auth.jwt_secret = SECRET.into();
    let server = start(cfg.clone()).await;
    let valid = token(serde_json::json!({"name":"carol","exp":in_an_hour()}));
    let cookie = format!("scalechat_token={valid}");
    // Another site's page, which the browser sends the user's cookie from: refused, even
    // with `allowed_origins` empty.
    let evil = [("origin", "https://evil.example.com"), ("cookie", &cookie)];
    let (status, body, _) = upgrade(&server, "", &evil).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("scalechat_token cookie"), "{body}");
    let null = [("origin", "null"), ("cookie", &cookie)];
    assert_eq!(upgrade(&server, "", &null).await.0, 403);
    // This site's own page (Origin matches Host): accepted.
    let own = format!("http://{}", server.addr);
    let (status, _, client) = upgrade(&server, "", &[("origin", &own), ("cookie", &cookie)]).await;
    assert_eq!(status, 101);
    assert_eq!(client.unwrap().expect("welcome").await["name"], "carol");
    // A page that sends the token itself is not riding on the user's cookie: any origin may,
    // while `allowed_origins` is empty.
    let (status, _, client) = upgrade(
        &server,
        &format!("token={valid}"),
        &[("origin", "https://elsewhere.example.com")],
    )
    .await;
    assert_eq!(status, 101);
    assert_eq!(client.unwrap().expect("welcome").await["name"], "carol");
    let (status, _, _) = upgrade(&server, &format!("token={valid}"), &evil).await;
    assert_eq!(status, 101, "the query's token wins over the cookie");
    server.stop().await;

    // Listed origins may use the cookie.
    cfg.server.allowed_origins = vec!["https://chat.example.com".into()];
    let server = start(cfg).await;
    let listed = [("origin", "https://chat.example.com"), ("cookie", &cookie)];
    assert_eq!(upgrade(&server, "", &listed).await.0, 101);
    let own = format!("http://{}", server.addr);
    let (status, body, _) = upgrade(&server, "", &[("origin", &own), ("cookie", &cookie)]).await;
    assert_eq!(
        status, 403,
        "with a list, only listed origins connect: {body}"
    );
    server.stop().await;
}

#[tokio::test]
async fn tokens_are_checked_for_nbf_and_the_configured_audience_and_issuer() {
    let mut cfg = config();
    cfg.auth.jwt_secret = SECRET.into();
    cfg.auth.jwt_audience = "scalechat".into();
    cfg.auth.jwt_issuer = "https://id.example.com".into();
    let server = start(cfg).await;
    let claims = |aud: &str, iss: &str, nbf: u64| serde_json::json!({"name":"erin","exp":in_an_hour(),"aud":aud,"iss":iss,"nbf":nbf});
    let now = in_an_hour() - 3600;
    let right = token(claims("scalechat", "https://id.example.com", now));
    let (status, _, client) = upgrade(&server, &format!("token={right}"), &[]).await;
    assert_eq!(status, 101);
    assert_eq!(client.unwrap().expect("welcome").await["name"], "erin");
    for (claims, why) in [
        (
            claims("scalechat", "https://id.example.com", now + 3600),
            "Immature",
        ),
        (
            claims("other", "https://id.example.com", now),
            "InvalidAudience",
        ),
        (
            claims("scalechat", "https://evil.example", now),
            "InvalidIssuer",
        ),
        (
            serde_json::json!({"name":"erin","exp":in_an_hour()}),
            "Missing required claim",
        ),
    ] {
        let (status, body, _) =
            upgrade(&server, &format!("token={}", token(claims.clone())), &[]).await;
        assert_eq!(status, 401, "{claims}: {body}");
        assert!(body.contains(why), "{claims}: {body}");
    }
}
