use std::time::Duration;

use clap::{CommandFactory, Parser};

use super::worker::RunArgs;
use super::{Cli, Command, parse_seconds};

#[test]
fn cli_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn seconds_parse() {
    assert_eq!(parse_seconds("2").unwrap(), Duration::from_secs(2));
    assert_eq!(parse_seconds("0.5").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_seconds("3s").unwrap(), Duration::from_secs(3));
    assert!(parse_seconds("-1").is_err());
    assert!(parse_seconds("soon").is_err());
    assert!(parse_seconds("1e9").is_err());
}

#[test]
fn run_args_become_a_worker_config() {
    let cli = Cli::try_parse_from([
        "sqs-worker",
        "run",
        "--database-url",
        "postgres://x",
        "--queue-url",
        "http://q/000/orders",
        "--key",
        "/a",
        "--key",
        "/b",
        "--exit-when-idle",
        "1.5",
        "--",
        "handle.sh",
        "--flag",
    ])
    .unwrap();
    let Command::Run(args) = cli.command else {
        panic!("expected run")
    };
    assert_eq!(args.handler.command, ["handle.sh", "--flag"]);
    let config = args.worker_config().unwrap();
    assert_eq!(config.key.pointers(), ["/a", "/b"]);
    assert_eq!(config.exit_when_idle, Some(Duration::from_millis(1500)));
    assert_eq!((config.pollers, config.max_pollers), (1, 10));
}

fn parse_run(extra: &[&str]) -> Result<RunArgs, clap::Error> {
    let mut argv = vec![
        "sqs-worker",
        "run",
        "--database-url",
        "postgres://x",
        "--queue-url",
        "q",
    ];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv)?.command {
        Command::Run(args) => Ok(args),
        other => panic!("expected run, got {other:?}"),
    }
}

#[test]
fn http_options_choose_the_http_handler() {
    let args = parse_run(&[
        "--http-url",
        "https://hooks.example.com/in",
        "--http-timeout",
        "2.5",
        "--http-header",
        "Authorization: Bearer s3cret",
        "--http-header",
        "X-Tenant: t1",
    ])
    .unwrap();
    let handler = &args.handler;
    assert_eq!(handler.http_timeout, Duration::from_millis(2500));
    assert_eq!(handler.http_headers.len(), 2);
    assert!(handler.build_handler().is_ok());
    let debug = format!("{args:?}");
    assert!(
        !debug.contains("s3cret"),
        "header values stay out of Debug: {debug}"
    );
}

#[test]
fn exactly_one_handler_may_be_chosen() {
    let url = ["--http-url", "http://127.0.0.1:9/hook"];
    for extra in [
        &[&url[..], &["--", "handle.sh"]].concat()[..],
        &[&url[..], &["--handler", "noop"]].concat()[..],
        &["--handler", "noop", "--", "handle.sh"][..],
        &["--http-timeout", "5", "--", "handle.sh"][..],
        &["--http-timeout", "5"][..],
        &["--http-header", "X-A: b", "--handler", "noop"][..],
    ] {
        let error = parse_run(extra).unwrap_err();
        assert!(
            matches!(
                error.kind(),
                clap::error::ErrorKind::ArgumentConflict
                    | clap::error::ErrorKind::MissingRequiredArgument
            ),
            "{extra:?}: {error}"
        );
    }
    let error = parse_run(&[])
        .unwrap()
        .handler
        .build_handler()
        .err()
        .unwrap();
    assert!(error.contains("--http-url"), "{error}");
    let error = parse_run(&["--http-url", "ftp://x/y"])
        .unwrap()
        .handler
        .build_handler()
        .err()
        .unwrap();
    assert!(error.contains("http or https"), "{error}");
    let error =
        parse_run(&[&url[..], &["--http-header", "Idempotency-Key: x"]].concat()).unwrap_err();
    assert!(error.to_string().contains("set by sqs-worker"), "{error}");
}

#[test]
fn bad_pointers_are_rejected_with_advice() {
    let cli = Cli::try_parse_from([
        "sqs-worker",
        "run",
        "--database-url",
        "postgres://x",
        "--queue-url",
        "q",
        "--key",
        "order_id",
        "--handler",
        "noop",
    ])
    .unwrap();
    let Command::Run(args) = cli.command else {
        panic!("expected run")
    };
    let error = args.worker_config().unwrap_err();
    assert!(error.contains("must start with '/'"), "{error}");
}
