// Post step: finish the task, which revokes its credentials, whatever happened to the job.
//
// GitHub does not tell a post step how the job went. A later step can say it through the
// environment: `echo "BROKER_TASK_OUTCOME=${{ job.status }}" >> "$GITHUB_ENV"` in an
// `if: always()` step (success/failure/cancelled are understood, as are the broker's own
// succeeded/failed/cancelled). Without it the outcome is `succeeded`.
'use strict';

const lib = require('./lib');

const OUTCOMES = {
  success: 'succeeded',
  succeeded: 'succeeded',
  failure: 'failed',
  failed: 'failed',
  cancelled: 'cancelled',
};

async function post() {
  const taskId = process.env.STATE_task_id;
  if (!taskId) {
    console.log('No task was started; nothing to finish.');
    return;
  }
  const url = lib.input('url');
  const audience = lib.input('audience', 'credential-broker') || 'credential-broker';
  const requested = (process.env.BROKER_TASK_OUTCOME || '').trim().toLowerCase();
  const outcome = OUTCOMES[requested] || 'succeeded';
  let finished;
  let lastError;
  // Finishing twice changes nothing at the broker, so every failure is worth another try.
  for (let attempt = 0; attempt < 5 && !finished; attempt++) {
    try {
      finished = await lib.call(url, audience, 'POST', '/task/finish', { task_id: taskId, outcome });
    } catch (error) {
      lastError = error;
      if (error instanceof lib.BrokerError && error.status < 500 && error.status !== 429) {
        break;
      }
      await lib.sleep(lib.backoff(attempt));
    }
  }
  if (!finished) {
    lib.command(
      'error',
      `credential broker: could not finish task ${taskId} (${lastError && lastError.message}); ` +
        'its credentials stay valid until the task deadline, when the broker revokes them',
    );
    process.exitCode = 1;
    return;
  }
  const pending = (finished.leases || []).filter((lease) => lease.state !== 'revoked').map((lease) => lease.name);
  if (pending.length) {
    lib.command('warning', `task ${taskId} finished (${outcome}); Vault revocation pending for ${pending.join(', ')}`);
  } else {
    console.log(`Task ${taskId} finished (${outcome}); credentials revoked`);
  }
}

post().catch((error) => {
  lib.command('error', `credential broker: ${error.message}`);
  process.exitCode = 1;
});
