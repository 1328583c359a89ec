//! The management client used by `outpost token …` and `outpost scope-map …`: which registry
//! to talk to (`--registry` or `OUTPOST_REGISTRY`), which credentials to use (`--username` /
//! `--password`, `OUTPOST_USERNAME` / `OUTPOST_PASSWORD`, or the registry's entry in
//! `~/.docker/config.json`, so `docker login` is enough), and JSON calls to `/api/v1`.

use anyhow::{Context, bail};
use base64::Engine as _;
use serde_json::Value;

/// Listed under their own heading in every command's help: they apply to the commands that
/// talk to a registry, not to `serve` or `config`.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Management options (commands that talk to a registry)")]
pub struct Connection {
    /// Registry URL or host[:port], e.g. http://registry.example:5000
    #[arg(
        long,
        short = 'r',
        global = true,
        env = "OUTPOST_REGISTRY",
        default_value = "http://localhost:5000"
    )]
    pub registry: String,
    /// Token name to authenticate with
    #[arg(long, short = 'u', global = true, env = "OUTPOST_USERNAME")]
    pub username: Option<String>,
    /// Password (a value that begins with `-` is taken as the password, not as a flag)
    #[arg(
        long,
        global = true,
        env = "OUTPOST_PASSWORD",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    pub password: Option<String>,
    /// Output format
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// JMESPath query applied to the command's JSON answer, as az's --query; the result is
    /// printed in the form --output asks for (e.g. --query ACR_REGISTRY_CONNECTION_STRING -o tsv)
    #[arg(long, global = true, value_name = "JMESPATH")]
    pub query: Option<String>,
}

impl Connection {
    fn compiled_query(&self) -> anyhow::Result<Option<jmespath::Expression<'static>>> {
        self.query
            .as_deref()
            .map(|q| {
                jmespath::compile(q).map_err(|e| anyhow::anyhow!("invalid --query {q:?}: {e}"))
            })
            .transpose()
    }

    /// Prints the command's JSON answer `v` when `--output json` or `--query` asks for it, and
    /// returns true; false leaves the printing to the command's own table or TSV.
    ///
    /// With `--query`, the selected part is printed in the generic form of `--output`, as az
    /// prints it: JSON; TSV with a scalar as plain text, a list one item per line and an
    /// object's values tab-separated; a table with one row per object or per scalar. TSV and
    /// table columns follow the order a `{…}` in the query wrote its keys, as az's do; JSON
    /// objects come out with sorted keys.
    pub fn print_generic(&self, v: &Value) -> anyhow::Result<bool> {
        if self.output == Output::None {
            if holds_new_password(v) {
                eprintln!(
                    "warning: the answer holds a password shown only once, and --output none prints nothing"
                );
            }
            return Ok(true);
        }
        let Some(expr) = self.compiled_query()? else {
            if self.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(v)?);
                return Ok(true);
            }
            return Ok(false);
        };
        let found = expr
            .search(v)
            .map_err(|e| anyhow::anyhow!("--query {:?}: {e}", expr.as_str()))
            .and_then(|f| Ok(serde_json::to_value(&*f)?));
        // A password the command just made is shown once: when the query fails or selects
        // nothing, the whole answer goes to stderr rather than the password being lost.
        if matches!(found, Err(_) | Ok(Value::Null)) && holds_new_password(v) {
            eprintln!(
                "warning: --query {:?} selected nothing from an answer that holds a password shown only once; the whole answer:\n{}",
                expr.as_str(),
                serde_json::to_string_pretty(v)?
            );
        }
        let found = found?;
        let keys = written_keys(expr.as_ast());
        let keys = keys.as_deref();
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&found)?),
            Output::Tsv => {
                for line in tsv_lines(&found, keys) {
                    println!("{line}");
                }
            }
            Output::Table | Output::None => print_generic_table(&found, keys),
        }
        Ok(true)
    }
}

/// The keys of the object a query ends in, in the order the query wrote them (`{b: x, a: y}`,
/// also after a projection, a filter or a pipe): the columns of TSV and table output.
fn written_keys(ast: &jmespath::ast::Ast) -> Option<Vec<String>> {
    use jmespath::ast::Ast;
    match ast {
        Ast::MultiHash { elements, .. } => Some(elements.iter().map(|kv| kv.key.clone()).collect()),
        Ast::Projection { rhs, .. } | Ast::Subexpr { rhs, .. } => written_keys(rhs),
        _ => None,
    }
}

/// An object's entries, the query's keys first in its order, then the rest by name.
fn entries<'a>(
    m: &'a serde_json::Map<String, Value>,
    keys: Option<&[String]>,
) -> Vec<(&'a String, &'a Value)> {
    let keys = keys.unwrap_or_default();
    let mut out: Vec<(&String, &Value)> = keys.iter().filter_map(|k| m.get_key_value(k)).collect();
    out.extend(m.iter().filter(|(k, _)| !keys.contains(k)));
    out
}

/// Whether an answer holds a password that was just generated (token create, credential
/// generate, get-settings --generate-password): the registry keeps only its hash.
fn holds_new_password(v: &Value) -> bool {
    match v {
        Value::Object(m) => {
            m.get("SYNC_TOKEN_PASSWORD")
                .and_then(Value::as_str)
                .is_some_and(|p| !p.is_empty() && !p.starts_with('<'))
                || m.get("passwords")
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.iter().any(|p| p["value"].is_string()))
                || m.values().any(holds_new_password)
        }
        Value::Array(a) => a.iter().any(holds_new_password),
        _ => false,
    }
}

/// A value as text in a TSV or table cell, as az writes it: strings unquoted, null empty,
/// booleans `True`/`False`, anything else as JSON.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

fn tsv_lines(v: &Value, keys: Option<&[String]>) -> Vec<String> {
    let row = |v: &Value| match v {
        Value::Object(m) => entries(m, keys)
            .into_iter()
            .map(|(_, v)| cell(v))
            .collect::<Vec<_>>()
            .join("\t"),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join("\t"),
        other => cell(other),
    };
    match v {
        Value::Array(items) => items.iter().map(row).collect(),
        Value::Null => Vec::new(),
        other => vec![row(other)],
    }
}

fn print_generic_table(v: &Value, keys: Option<&[String]>) {
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Null => Vec::new(),
        other => vec![other],
    };
    let mut header: Vec<String> = Vec::new();
    for i in &items {
        if let Value::Object(m) = i {
            for (k, _) in entries(m, keys) {
                if !header.contains(k) {
                    header.push(k.clone());
                }
            }
        }
    }
    if header.is_empty() {
        let rows: Vec<Vec<String>> = items.iter().map(|i| vec![cell(i)]).collect();
        print_rows(Output::Table, &["RESULT"], &rows);
        return;
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| header.iter().map(|k| cell(&i[k.as_str()])).collect())
        .collect();
    let upper: Vec<String> = header.iter().map(|h| h.to_uppercase()).collect();
    let names: Vec<&str> = upper.iter().map(String::as_str).collect();
    print_rows(Output::Table, &names, &rows);
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Json,
    Table,
    Tsv,
    /// Nothing on stdout (az's `-o none`): for scripts that need only the exit status.
    None,
}

/// An error status from the registry, with its message: callers that treat one status
/// specially (a 404 while waiting, say) downcast to this instead of reading the text.
#[derive(Debug)]
pub struct HttpStatus {
    pub status: reqwest::StatusCode,
    pub message: String,
}

impl std::fmt::Display for HttpStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for HttpStatus {}

/// Percent-encodes a query parameter value.
pub fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub struct Client {
    base: String,
    auth: (String, String),
    http: reqwest::Client,
}

/// Credentials stored by `docker login` for `host` (`auths.<host>.auth`, base64 `user:pass`).
fn docker_config_credentials(host: &str) -> Option<(String, String)> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".docker")))?;
    let cfg: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).ok()?).ok()?;
    let auths = cfg.get("auths")?.as_object()?;
    let entry = auths
        .iter()
        .find(|(k, _)| {
            k.trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/')
                == host
        })?
        .1;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry.get("auth")?.as_str()?)
        .ok()?;
    let s = String::from_utf8(decoded).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

impl Client {
    pub fn new(c: &Connection) -> anyhow::Result<Client> {
        // A mistake in --query is refused before the command changes anything.
        c.compiled_query()?;
        let base = c.registry.trim_end_matches('/').to_string();
        let base = if base.starts_with("http://") || base.starts_with("https://") {
            base
        } else if let Some((scheme, _)) = base.split_once("://") {
            bail!(
                "--registry {base}: {scheme}:// is not a registry address; give http://host:port, https://host:port or host:port"
            );
        } else {
            format!("http://{base}")
        };
        let host = base
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string();
        let auth = match (&c.username, &c.password) {
            (Some(u), Some(p)) => (u.clone(), p.clone()),
            (Some(_), None) | (None, Some(_)) => bail!("give both --username and --password (or neither, to use docker login's credentials)"),
            (None, None) => docker_config_credentials(&host).with_context(|| {
                format!("no credentials for {host}: pass --username/--password, set OUTPOST_USERNAME/OUTPOST_PASSWORD, or run `docker login {host}`")
            })?,
        };
        Ok(Client {
            base,
            auth,
            http: reqwest::Client::new(),
        })
    }

    /// A GET of any path of the registry (the v2 API, the gateway), failing with the
    /// registry's message on an error status.
    pub async fn get(&self, path: &str, accept: Option<&str>) -> anyhow::Result<reqwest::Response> {
        let mut req = self
            .http
            .get(format!("{}{path}", self.base))
            .basic_auth(&self.auth.0, Some(&self.auth.1));
        if let Some(a) = accept {
            req = req.header(reqwest::header::ACCEPT, a);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the registry at {}: {e}", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["errors"][0]["message"].as_str().map(String::from))
                .unwrap_or(body);
            bail!("GET {path}: {msg} ({status})");
        }
        Ok(resp)
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Option<Value>> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .basic_auth(&self.auth.0, Some(&self.auth.1));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            let mut why = outpost_oci::error::error_chain(&e);
            let given = std::env::var("SSL_CERT_FILE")
                .ok()
                .filter(|f| !f.is_empty());
            if let Some(hint) = outpost_oci::error::certificate_hint(
                &why,
                "set SSL_CERT_FILE to that CA's PEM file",
                given.as_deref(),
            ) {
                why.push_str(&format!(" ({hint})"));
            }
            if why.contains("invalid HTTP version") && self.base.starts_with("http://") {
                why.push_str(" (the registry may serve HTTPS: give --registry https://…)");
            }
            if why.contains("InvalidContentType") && self.base.starts_with("https://") {
                why.push_str(" (the registry serves plain HTTP: give --registry http://…)");
            }
            anyhow::anyhow!("cannot reach the registry at {}: {why}", self.base)
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .context("reading the registry's answer")?;
        if !status.is_success() {
            let message = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["errors"][0]["message"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(HttpStatus { status, message }.into());
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            serde_json::from_slice(&bytes).context("the registry's answer is not JSON")?,
        ))
    }
}

/// Asks "question (y/N)" on the terminal unless `yes`; refuses in non-interactive use.
pub fn confirm(question: &str, yes: bool) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("{question} Pass --yes to confirm when not running interactively.");
    }
    eprint!("{question} (y/N): ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        bail!("cancelled")
    }
}

/// Prints rows as an aligned table (with a header) or TSV (without).
pub fn print_rows(output: Output, header: &[&str], rows: &[Vec<String>]) {
    match output {
        Output::None => {}
        Output::Tsv => {
            for r in rows {
                println!("{}", r.join("\t"));
            }
        }
        _ => {
            let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
            for r in rows {
                for (i, c) in r.iter().enumerate() {
                    w[i] = w[i].max(c.chars().count());
                }
            }
            let line = |cells: Vec<String>| {
                cells
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c:<width$}", width = w[i]))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            println!("{}", line(header.iter().map(|h| h.to_string()).collect()));
            println!("{}", line(w.iter().map(|n| "-".repeat(*n)).collect()));
            for r in rows {
                println!("{}", line(r.clone()));
            }
        }
    }
}
