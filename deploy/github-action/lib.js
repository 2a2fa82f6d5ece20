// Shared by main.js and post.js. Plain Node 20 (global fetch, crypto.randomUUID), no
// dependencies and no build step, so what is reviewed here is exactly what runs.
'use strict';

const crypto = require('crypto');
const fs = require('fs');

function input(name, fallback = '') {
  const value = process.env[`INPUT_${name.replace(/ /g, '_').toUpperCase()}`];
  return value === undefined ? fallback : value.trim();
}

// Workflow commands escape these, or a value could end the command early.
function escapeData(value) {
  return String(value).replace(/%/g, '%25').replace(/\r/g, '%0D').replace(/\n/g, '%0A');
}

function command(name, message) {
  process.stdout.write(`::${name}::${escapeData(message)}\n`);
}

// `NAME<<DELIMITER` blocks, the runner's multiline-safe syntax for GITHUB_ENV, GITHUB_OUTPUT
// and GITHUB_STATE; the delimiter is random so no value can contain it by accident or design.
function appendFileCommand(variable, name, value) {
  const path = process.env[variable];
  if (!path) {
    throw new Error(`$${variable} is not set: is this running inside a GitHub Actions job?`);
  }
  let delimiter;
  do {
    delimiter = `ghadelimiter_${crypto.randomUUID()}`;
  } while (String(value).includes(delimiter));
  fs.appendFileSync(path, `${name}<<${delimiter}\n${value}\n${delimiter}\n`, { encoding: 'utf8' });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function backoff(attempt) {
  return Math.min(8000, 500 * 2 ** attempt) * (0.8 + Math.random() * 0.4);
}

async function oidcToken(audience) {
  const url = process.env.ACTIONS_ID_TOKEN_REQUEST_URL;
  const requestToken = process.env.ACTIONS_ID_TOKEN_REQUEST_TOKEN;
  if (!url || !requestToken) {
    throw new Error("no OIDC token: give the job `permissions: id-token: write`");
  }
  const separator = url.includes('?') ? '&' : '?';
  for (let attempt = 0; ; attempt++) {
    try {
      const response = await fetch(`${url}${separator}audience=${encodeURIComponent(audience)}`, {
        headers: { Authorization: `Bearer ${requestToken}`, Accept: 'application/json' },
      });
      if (response.ok) {
        const body = await response.json();
        if (typeof body.value === 'string' && body.value) {
          return body.value;
        }
        throw new Error('the OIDC endpoint answered without a token');
      }
      if (attempt >= 3 || response.status < 500) {
        throw new Error(`the OIDC endpoint answered HTTP ${response.status}`);
      }
    } catch (error) {
      if (attempt >= 3) {
        throw error;
      }
    }
    await sleep(backoff(attempt));
  }
}

class BrokerError extends Error {
  constructor(status, problem) {
    const code = (problem && problem.code) || 'http_error';
    const detail = (problem && problem.detail) || `HTTP ${status}`;
    super(`${status} ${code}: ${detail}`);
    this.status = status;
    this.code = code;
  }
}

// One broker call. `retry` is 'safe' (GET, finish: may repeat), 'keyed' (a start carrying its
// Idempotency-Key) or 'once' (a claim: repeated only when the broker said nothing happened).
// Each attempt gets a fresh OIDC token, so a slow job never sends an expired one.
async function call(base, audience, method, path, body, { retry = 'safe', headers = {}, attempts = 4 } = {}) {
  for (let attempt = 0; ; attempt++) {
    const token = await oidcToken(audience);
    let response;
    try {
      response = await fetch(base.replace(/\/+$/, '') + path, {
        method,
        redirect: 'manual',
        headers: {
          Authorization: `Bearer ${token}`,
          Accept: 'application/json',
          ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
          ...headers,
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(30000),
      });
    } catch (error) {
      // A claim may have reached the broker unless the connection was refused outright.
      const neverSent = error.cause && error.cause.code === 'ECONNREFUSED';
      if ((retry === 'once' && !neverSent) || attempt + 1 >= attempts) {
        throw new Error(`${method} ${path}: the broker did not answer (${error.name})`);
      }
      await sleep(backoff(attempt));
      continue;
    }
    if (response.ok) {
      return response.json();
    }
    let problem = null;
    try {
      problem = await response.json();
    } catch (ignored) {
      problem = null;
    }
    if ((response.status === 429 || response.status === 503) && attempt + 1 < attempts) {
      const after = Number(response.headers.get('retry-after'));
      await sleep(Number.isFinite(after) && after >= 0 && after <= 60 ? after * 1000 : backoff(attempt));
      continue;
    }
    throw new BrokerError(response.status, problem);
  }
}

// Same names as `broker exec` (broker/client/env.py): credential `db` -> DB_USERNAME, ...
function envName(...parts) {
  return parts.join('_').toUpperCase().replace(/[^A-Z0-9]/g, '_');
}

function credentialEnv(credentials, taskId, expiresAt) {
  const env = {};
  for (const [name, credential] of Object.entries(credentials || {})) {
    for (const [field, value] of Object.entries(credential.data || {})) {
      const variable = envName(name, field);
      if (variable in env) {
        throw new Error(`two credential fields both become $${variable}`);
      }
      env[variable] = typeof value === 'string' ? value : JSON.stringify(value);
    }
  }
  env.BROKER_TASK_ID = taskId;
  env.BROKER_TASK_EXPIRES_AT = expiresAt;
  return env;
}

function secretValues(credentials) {
  const found = new Set();
  const walk = (value) => {
    if (typeof value === 'string') {
      if (value) found.add(value);
    } else if (Array.isArray(value)) {
      value.forEach(walk);
    } else if (value && typeof value === 'object') {
      Object.values(value).forEach(walk);
    }
  };
  for (const credential of Object.values(credentials || {})) {
    walk(credential.data);
  }
  return found;
}

module.exports = {
  BrokerError,
  appendFileCommand,
  backoff,
  call,
  command,
  credentialEnv,
  input,
  secretValues,
  sleep,
};
