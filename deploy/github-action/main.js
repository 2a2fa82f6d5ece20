// Main step: start the task with the job's OIDC identity, wait for an approval if asked,
// mask every secret value, then export the credentials to the following steps.
'use strict';

const crypto = require('crypto');
const lib = require('./lib');

// JSON object, flat YAML (`key: value`) or KEY=VALUE lines; YAML/KEY=VALUE values are strings.
function parseContext(text) {
  if (!text) {
    return undefined;
  }
  if (text.startsWith('{')) {
    const parsed = JSON.parse(text);
    if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) {
      throw new Error('context: a JSON context must be an object');
    }
    return parsed;
  }
  const context = {};
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) {
      continue;
    }
    const match = /^([^=:\s]+)\s*(?:=|:\s)\s*(.*)$/.exec(line) || /^([^=:\s]+)\s*:$/.exec(line);
    if (!match) {
      throw new Error(`context: expected KEY=VALUE or "key: value", got a line starting ${JSON.stringify(line.slice(0, 20))}`);
    }
    let value = match[2] === undefined ? '' : match[2].trim();
    if (/^(["']).*\1$/.test(value)) {
      value = value.slice(1, -1);
    }
    context[match[1]] = value;
  }
  return context;
}

async function waitForApproval(url, audience, taskId, seconds) {
  const deadline = Date.now() + seconds * 1000;
  let interval = 2000;
  for (;;) {
    const task = await lib.call(url, audience, 'GET', `/task/${taskId}`);
    const approval = task.approval || {};
    if (task.state === 'pending_approval' && approval.state === 'approved') {
      return lib.call(url, audience, 'POST', '/task/claim', { task_id: taskId }, { retry: 'once' });
    }
    if (task.state !== 'pending_approval' || ['denied', 'lapsed', 'claimed'].includes(approval.state)) {
      throw new Error(`task ${taskId} was not approved: ${task.end_reason || approval.state || task.state}`);
    }
    const remaining = deadline - Date.now();
    if (remaining <= 0) {
      throw new Error(`task ${taskId} still awaits approval after ${seconds}s; the post step withdraws it`);
    }
    await lib.sleep(Math.min(remaining, interval * (0.8 + Math.random() * 0.4)));
    interval = Math.min(15000, interval * 2);
  }
}

async function main() {
  const url = lib.input('url');
  const audience = lib.input('audience', 'credential-broker') || 'credential-broker';
  const body = {
    task: lib.input('task'),
    owner: lib.input('owner'),
    purpose: lib.input('purpose'),
  };
  for (const [name, value] of Object.entries({ url, ...body })) {
    if (!value) {
      throw new Error(`input '${name}' is required`);
    }
  }
  const context = parseContext(lib.input('context'));
  if (context !== undefined) {
    body.context = context;
  }
  const ttl = lib.input('ttl');
  if (ttl) {
    body.ttl_seconds = Number.parseInt(ttl, 10);
  }
  const wait = Number(lib.input('wait', '0') || '0');

  let answer = await lib.call(url, audience, 'POST', '/task/start', body, {
    retry: 'keyed',
    headers: { 'Idempotency-Key': crypto.randomUUID() },
  });
  const taskId = answer.task_id;
  // Saved before anything else can fail, so the post step finishes this task in every case.
  lib.appendFileCommand('GITHUB_STATE', 'task_id', taskId);
  lib.appendFileCommand('GITHUB_OUTPUT', 'task-id', taskId);

  if (answer.state === 'pending_approval') {
    if (!(wait > 0)) {
      throw new Error(`task ${taskId} needs approval; set the 'wait' input to wait for it`);
    }
    console.log(`Task ${taskId} waits for approval (until ${answer.approval_expires_at}); waiting up to ${wait}s`);
    answer = await waitForApproval(url, audience, taskId, wait);
  }

  // Every secret is masked before it is written anywhere a later step could echo it from.
  // A multi-line value (a private key) is masked line by line too, as the runner matches
  // masks within single log lines.
  const secrets = lib.secretValues(answer.credentials);
  for (const secret of secrets) {
    lib.command('add-mask', secret);
    for (const line of secret.split(/\r?\n/)) {
      if (line.trim() && line !== secret) {
        lib.command('add-mask', line);
      }
    }
  }
  const env = lib.credentialEnv(answer.credentials, taskId, answer.expires_at);
  for (const [name, value] of Object.entries(env)) {
    lib.appendFileCommand('GITHUB_ENV', name, value);
  }
  lib.appendFileCommand('GITHUB_OUTPUT', 'expires-at', answer.expires_at);
  const names = Object.keys(env).sort().join(', ');
  console.log(`Task ${taskId} (${body.task}) active until ${answer.expires_at}; exported ${names}`);
}

main().catch((error) => {
  lib.command('error', `credential broker: ${error.message}`);
  process.exitCode = 1;
});
