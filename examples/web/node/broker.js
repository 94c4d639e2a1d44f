// authbroker as this app uses it: BeginLogin, CompleteLogin and LinkIdentity
// with their ErrorInfo reasons, retried where the README's error table says
// the same call may be retried, and AdminService.ListProviders. The protos
// are read from the repository's proto/ at start: nothing is generated.

const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_DIR = process.env.AUTHBROKER_PROTO_DIR || path.resolve(__dirname, '../../../proto');

// Reasons after which the README says to retry CompleteLogin or LinkIdentity
// with the same state and code (ticket and user id). Every other reason is final.
const RETRY_SAME_CALL = new Set([
  'LOGIN_IN_PROGRESS',
  'PROVIDER_UNAVAILABLE',
  'STORE_UNAVAILABLE',
  'STATE_STORE_UNAVAILABLE',
  'TOO_MANY_PENDING_LOGINS',
  'SERVER_OVERLOADED',
  'BROKER_UNREACHABLE',
]);
const BACKOFF_MS = [200, 500, 1000];
const CALL_TIMEOUT_MS = 30_000;

const definition = protoLoader.loadSync(['authbroker/v1/login.proto', 'authbroker/v1/admin.proto'], {
  includeDirs: [PROTO_DIR],
  enums: String,
  longs: String,
  defaults: true,
});
const pb = grpc.loadPackageDefinition(definition).authbroker.v1;

// grpc-js hands over the status details undecoded: google.rpc.Status is
// three fields (its Any is two), and ErrorInfo comes from proto/.
const statusRoot = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
`, { keepCase: true }).root;
const Status = statusRoot.lookupType('google.rpc.Status');
const ErrorInfo = protobuf
  .loadSync(path.join(PROTO_DIR, 'google/rpc/error_details.proto'))
  .lookupType('google.rpc.ErrorInfo');

/** A failed call, by its ErrorInfo reason (BROKER_UNREACHABLE when
 * authbroker could not be reached at all). */
class BrokerError extends Error {
  constructor(reason, code) {
    super(reason);
    this.reason = reason;
    this.code = code;
  }
}

function brokerError(err) {
  const [details] = err.metadata?.get('grpc-status-details-bin') ?? [];
  if (details) {
    for (const any of Status.decode(details).details) {
      if (any.type_url.endsWith('/google.rpc.ErrorInfo')) {
        return new BrokerError(ErrorInfo.decode(any.value).reason, err.code);
      }
    }
  }
  return new BrokerError(err.code === grpc.status.UNAVAILABLE ? 'BROKER_UNREACHABLE' : 'INTERNAL', err.code);
}

class Broker {
  constructor(address, apiKey) {
    const credentials = grpc.credentials.createInsecure();
    this.login = new pb.LoginService(address, credentials);
    this.admin = new pb.AdminService(address, credentials);
    // The API key goes in every call's metadata and nowhere else: never in
    // a page, a log line or an error message.
    this.metadata = new grpc.Metadata();
    if (apiKey) this.metadata.set('authorization', `Bearer ${apiKey}`);
  }

  call(client, method, request) {
    return new Promise((resolve, reject) => {
      const deadline = new Date(Date.now() + CALL_TIMEOUT_MS);
      client[method](request, this.metadata, { deadline }, (err, answer) =>
        err ? reject(brokerError(err)) : resolve(answer),
      );
    });
  }

  async callWithRetries(client, method, request) {
    for (const delay of [...BACKOFF_MS, null]) {
      try {
        return await this.call(client, method, request);
      } catch (e) {
        if (!(e instanceof BrokerError) || !RETRY_SAME_CALL.has(e.reason) || delay === null) throw e;
        console.warn(`authbroker answered ${e.reason}; retrying the same call in ${delay} ms`);
        await sleep(delay);
      }
    }
  }

  /** [name, display name] of each enabled provider. ListProviders needs an
   * admin key; `authbroker dev` has no keys, so every caller may. */
  async providers() {
    const answer = await this.call(this.admin, 'ListProviders', {});
    return answer.providers.filter((p) => p.enabled).map((p) => [p.name, p.displayName || p.name]);
  }

  begin(provider, redirectUri, returnTo) {
    return this.call(this.login, 'BeginLogin', { provider, redirectUri, returnTo });
  }

  complete(state, code, error, errorDescription) {
    return this.callWithRetries(this.login, 'CompleteLogin', { state, code, error, errorDescription });
  }

  link(linkTicket, userId) {
    return this.callWithRetries(this.login, 'LinkIdentity', { linkTicket, userId });
  }
}

module.exports = { Broker, BrokerError, RETRY_SAME_CALL };
