// A real OAuth 2.0 / OpenID Connect authorization server for tokenbroker's system tests.
//
// Built on `oidc-provider` (OpenID Certified, pinned in package.json) so the broker is tested
// against real token-endpoint semantics, not against a mock of our own assumptions.  On top of
// the stock provider this file adds only test plumbing:
//
//   * a non-interactive login/consent handler (fixed account `test-user`), or with config
//     `interactive` oidc-provider's own HTML login and consent pages,
//   * the RFC 7523 JWT bearer grant as Google uses it for service accounts,
//   * a ledger file of every token value issued by /token (tests scan logs for them),
//   * fault injection and counters under /test/ (never part of the OAuth surface),
//   * an optional fixed latency on /token.
//
// Usage:  node tests/oidc_server/server.mjs CONFIG_JSON_PATH
// Prints `READY <issuer>` on stdout once listening on 127.0.0.1.  The server never prints a
// token value to stdout/stderr: the tests scan every log for issued tokens.
//
// Config JSON (written by tests/support/oidc.py):
//   port             TCP port to bind on 127.0.0.1
//   issuer           e.g. http://127.0.0.1:PORT (no trailing slash)
//   ledger           file path; every token value returned by /token is appended, one per line
//   accessTokenTtl   seconds, default 300
//   latencyMs        delay added to every POST /token, default 0
//   serviceAccounts  [{client_email, public_jwk}] trusted for the JWT bearer grant
//   jwks             {keys: [private RSA JWK, ...]} fixed signing keys (stable across restarts)
//   clients          static client metadata (RFC 7591 names), passed to oidc-provider as is
//   jwtBearerClientId  optional; id of the public client used for JWT bearer requests
//   strictClientAuthMethod  default true: a client must authenticate with its registered
//                    token_endpoint_auth_method (basic vs post), see clientAuthMismatch()
//   storeSize        entries the in-memory store keeps (default 5,000,000; see `storage`)
//   deviceInterval   seconds, the `interval` the device authorization endpoint answers (RFC
//                    8628 section 3.2; oidc-provider itself sends none, i.e. 5), default 1
//   deviceCodeTtl    seconds a device code lives, default 600 (oidc-provider's default)
//   interactive      default false: login and consent answer at once for `test-user` (fast
//                    system tests).  true: oidc-provider's own pages (devInteractions) for a
//                    real browser: a login form (any login, any password: type `test-user`),
//                    then a consent page whose Continue button grants and whose [ Cancel ]
//                    link denies (error=access_denied).  POST /test/consent has no effect.
//
// Test-control endpoints (JSON): POST/DELETE/GET /test/faults, GET /test/stats,
// POST /test/stats/reset, POST /test/latency {ms}, POST /test/service-accounts
// {client_email, public_jwk}, POST /test/grants {client_id, count, scope} (consent without the
// browser round trips, for suites that need hundreds of connections), POST
// /test/refresh-tokens {refresh_tokens: [...]} (is each still accepted? the fault suite's
// test for a lost connection; never consumes anything).

import { appendFileSync, readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

import * as jose from 'jose';
import Provider, { errors } from 'oidc-provider';
import MemoryAdapter from 'oidc-provider/lib/adapters/memory_adapter.js';
import LRU from 'oidc-provider/lib/helpers/lru.js';

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

const configPath = process.argv[2];
if (!configPath) {
  console.error('usage: node server.mjs CONFIG_JSON_PATH');
  process.exit(2);
}
const config = JSON.parse(readFileSync(configPath, 'utf8'));

const ISSUER = config.issuer.replace(/\/$/, '');
const PORT = Number(config.port);
const LEDGER = config.ledger;
const ACCESS_TOKEN_TTL = Number(config.accessTokenTtl ?? 300);
const REFRESH_TOKEN_TTL = 24 * 60 * 60; // refresh tokens are long-lived: 1 day
let latencyMs = Number(config.latencyMs ?? 0);
let deviceInterval = Number(config.deviceInterval ?? 1);
let deviceCodeTtl = Number(config.deviceCodeTtl ?? 600);

const TEST_ACCOUNT = 'test-user';
const INTERACTIVE = Boolean(config.interactive);

// The one protected resource (RFC 8707 resource indicator).  Every access token is issued for
// it, as an RS256-signed JWT (RFC 9068 "JWT Profile for OAuth 2.0 Access Tokens").
const API_RESOURCE = 'urn:tokenbroker:api';
const API_SCOPES = 'api:read api:write';

function apiResourceServerInfo() {
  return {
    scope: API_SCOPES,
    audience: API_RESOURCE,
    accessTokenTTL: ACCESS_TOKEN_TTL,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  };
}

// RFC 7523 section 2.1: the JWT bearer authorization grant type.
const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const JWT_BEARER_CLIENT_ID = config.jwtBearerClientId ?? 'jwt-bearer-public';
const MAX_ASSERTION_LIFETIME = 3600; // seconds; Google's limit for service-account assertions

const TOKEN_PATH = '/token';
const TOKEN_URL = `${ISSUER}${TOKEN_PATH}`;

// client_email -> public JWK of that service account's signing key.
const serviceAccounts = new Map(
  (config.serviceAccounts ?? []).map((sa) => [sa.client_email, sa.public_jwk]),
);

// Static clients from the config, plus the public client the JWT bearer grant runs under.
const clients = [...(config.clients ?? [])];
if (!clients.some((c) => c.client_id === JWT_BEARER_CLIENT_ID)) {
  clients.push({
    client_id: JWT_BEARER_CLIENT_ID,
    token_endpoint_auth_method: 'none',
    grant_types: [JWT_BEARER],
    response_types: [],
    redirect_uris: [],
  });
}

// ---------------------------------------------------------------------------------------------
// Provider
// ---------------------------------------------------------------------------------------------

// oidc-provider's default in-memory adapter keeps only the 1,000 most recent entries (tokens,
// grants, sessions...) and silently forgets the rest: past a few hundred refreshes a live
// refresh token would be "not found" (invalid_grant) as if it had been revoked.  The same
// adapter over a store that large forgets nothing a test can issue.
const storage = new LRU({ maxSize: Number(config.storeSize ?? 5_000_000) });

const provider = new Provider(ISSUER, {
  adapter: (model) => new MemoryAdapter(model, storage),
  clients,
  jwks: config.jwks,
  // Cookies carry the login/consent interaction state across redirects; any fixed key will do.
  cookies: { keys: ['tokenbroker-test-cookie-key'] },

  // openid/offline_access are OpenID Connect scopes; api:read/api:write are the API's scopes
  // (also listed by its resource server below).  Unknown scopes are silently dropped.
  scopes: ['openid', 'offline_access', 'api:read', 'api:write'],
  responseTypes: ['code'], // authorization code flow only (no implicit / hybrid)

  // One fixed end-user, shaped like a Google service-account identity, so its ID tokens can
  // stand in for Google's when tests authenticate callers (email + email_verified).
  async findAccount(ctx, sub) {
    return {
      accountId: sub,
      async claims() {
        return {
          sub,
          email: `${sub}@tokenbroker-test.iam.gserviceaccount.com`,
          email_verified: true,
        };
      },
    };
  },
  claims: { openid: ['sub'], email: ['email', 'email_verified'] },

  features: {
    // The non-interactive handler below, unless `interactive` asks for the provider's pages.
    devInteractions: { enabled: INTERACTIVE },
    clientCredentials: { enabled: true }, // RFC 6749 section 4.4
    deviceFlow: { enabled: true }, // RFC 8628
    // RFC 7662 at /token/introspection and RFC 7009 at /token/revocation.  Both work on opaque
    // tokens only (refresh tokens here): oidc-provider answers 400 unsupported_token_type for a
    // structured (JWT) access token.  Revoking a refresh token revokes its whole grant.
    // A client may only introspect or revoke its own tokens (RFC 7009 section 2.1).
    introspection: {
      enabled: true,
      allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId,
    },
    revocation: {
      enabled: true,
      allowedPolicy: async (ctx, client, token) => {
        if (token.clientId !== client.clientId) {
          throw new errors.InvalidRequest('client is not authorized to revoke the presented token');
        }
        return true;
      },
    },
    resourceIndicators: {
      // RFC 8707.  Requests without `resource` default to the API, so client_credentials and
      // authorization_code / refresh_token all yield JWT access tokens for it.
      enabled: true,
      defaultResource: async (ctx, client, oneOf) => oneOf ?? API_RESOURCE,
      // Without this, a refresh/code exchange whose scope includes `openid` would issue an
      // opaque userinfo-only access token instead of the API's JWT.
      useGrantedResource: async () => true,
      getResourceServerInfo: async (ctx, resourceIndicator) => {
        if (resourceIndicator !== API_RESOURCE) throw new errors.InvalidTarget();
        return apiResourceServerInfo();
      },
    },
  },

  // PKCE (RFC 7636) is required for every authorization code request; only S256 is supported.
  pkce: { required: () => true },

  // Rotate the refresh token on EVERY use (RFC 9700 section 4.14.2).  oidc-provider marks the
  // old token consumed; presenting a consumed token again is treated as replay: 400
  // invalid_grant AND the whole grant is revoked, so the rotated token dies too.
  // Except for clients whose id starts with `rt-fixed`: a provider that keeps the refresh
  // token (Google does), which the issuer's scope narrowing needs.
  rotateRefreshToken: (ctx) => !String(ctx.oidc.client?.clientId ?? '').startsWith('rt-fixed'),

  // Issue a refresh token to every client allowed the refresh_token grant, whether or not
  // offline_access survived the authorization request (oidc-provider drops offline_access
  // unless prompt=consent is sent, per OpenID Connect Core section 11).
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  expiresWithSession: async () => false,

  ttl: {
    AccessToken: ACCESS_TOKEN_TTL,
    ClientCredentials: ACCESS_TOKEN_TTL,
    AuthorizationCode: 60,
    IdToken: 3600,
    RefreshToken: REFRESH_TOKEN_TTL,
    Grant: 2 * REFRESH_TOKEN_TTL,
    Session: REFRESH_TOKEN_TTL,
    Interaction: 600,
    DeviceCode: () => deviceCodeTtl,
  },

  // JWT access tokens minted for the JWT bearer grant carry the service account as `sub`
  // (as Google's do), instead of the internal public client id.  The grant handler tags the
  // token with `serviceAccount`; extraTokenClaims copies it into the token payload (an `extra`
  // set on the model directly is overwritten by extraTokenClaims) and the JWT customizer moves
  // it into `sub`.
  extraTokenClaims: async (ctx, token) => (
    token.serviceAccount ? { service_account: token.serviceAccount } : undefined
  ),
  formats: {
    customizers: {
      jwt(ctx, token, jwt) {
        if (jwt.payload.service_account) {
          jwt.payload.sub = jwt.payload.service_account;
          delete jwt.payload.service_account;
        }
      },
    },
  },

  renderError(ctx, out) {
    ctx.type = 'json';
    ctx.body = out;
  },
});

// Error details (never token values) go to stderr to help debug failing tests.
for (const event of ['grant.error', 'revocation.error', 'introspection.error', 'server_error',
  'authorization.error']) {
  provider.on(event, (ctx, err) => {
    console.error(`${event}: ${err.error ?? err.name}: ${err.error_description ?? ''} `
      + `(${err.error_detail ?? err.message})`);
  });
}
// The refresh_token grant's reuse detection (lib/actions/grants/refresh_token.js): a consumed
// token is destroyed and its grant revoked, then this InvalidGrant is thrown.
const REUSE_DETAIL = 'refresh token already used';

// ---------------------------------------------------------------------------------------------
// RFC 7523 JWT bearer grant (as Google's token endpoint implements it for service accounts)
// ---------------------------------------------------------------------------------------------

function invalidGrant(description) {
  return new errors.CustomOIDCProviderError('invalid_grant', description);
}

async function jwtBearerHandler(ctx) {
  const { assertion, scope: requestedScope } = ctx.oidc.params;
  if (!assertion) {
    throw new errors.InvalidRequest('missing required parameter \'assertion\'');
  }

  let header;
  let claims;
  try {
    header = jose.decodeProtectedHeader(assertion);
    claims = jose.decodeJwt(assertion);
  } catch {
    throw invalidGrant('assertion is not a well-formed JWT');
  }

  // RFC 7523 section 3, item 1: `iss` identifies the issuer; here the service account email.
  const publicJwk = serviceAccounts.get(claims.iss);
  if (!publicJwk) {
    throw invalidGrant('assertion iss is not a known service account');
  }
  if (header.alg !== 'RS256') {
    throw invalidGrant('assertion must be signed with RS256');
  }
  if (publicJwk.kid && header.kid && header.kid !== publicJwk.kid) {
    throw invalidGrant('assertion kid does not match the service account key');
  }

  // RFC 7523 section 3, items 3, 4 and 9: `aud` must be the token endpoint, `exp` in the
  // future, and the signature must verify.
  try {
    const key = await jose.importJWK({ ...publicJwk, alg: 'RS256' }, 'RS256');
    await jose.jwtVerify(assertion, key, {
      algorithms: ['RS256'],
      audience: TOKEN_URL,
      issuer: claims.iss,
      requiredClaims: ['exp', 'iat'],
      clockTolerance: 0,
    });
  } catch (err) {
    throw invalidGrant(`assertion rejected: ${err.code ?? 'ERR'}: ${err.message}`);
  }

  // Google's extra rule: an assertion may be valid for at most one hour.
  if (claims.exp - claims.iat > MAX_ASSERTION_LIFETIME) {
    throw invalidGrant(`assertion lifetime exceeds ${MAX_ASSERTION_LIFETIME} seconds`);
  }

  // Google carries the requested scopes in the assertion's `scope` claim.
  const scope = typeof claims.scope === 'string' ? claims.scope.trim() : '';
  if (!scope) {
    throw invalidGrant('assertion has no scope claim');
  }
  if (requestedScope && requestedScope !== scope) {
    throw invalidGrant('scope parameter does not match the assertion scope claim');
  }

  // Mint the access token through the provider's own model, so it is stored and signed with
  // the provider's key (an RFC 9068 JWT for the API resource) like every other access token.
  const resourceServer = new provider.ResourceServer(API_RESOURCE, apiResourceServerInfo());
  const token = new provider.ClientCredentials({ client: ctx.oidc.client, scope });
  token.resourceServer = resourceServer;
  token.serviceAccount = claims.iss; // read by extraTokenClaims above
  const value = await token.save();

  // RFC 6749 section 5.1 successful response.
  ctx.body = {
    access_token: value,
    token_type: 'Bearer',
    expires_in: token.expiration,
    scope,
  };
}

provider.registerGrantType(JWT_BEARER, jwtBearerHandler, ['assertion', 'scope']);

// ---------------------------------------------------------------------------------------------
// Test plumbing: stats, faults, ledger, latency.  Middleware added with provider.use() runs
// before oidc-provider's own router.
// ---------------------------------------------------------------------------------------------

function freshStats() {
  return {
    token_requests: 0, // every POST /token
    token_requests_by_grant_type: {}, // grant_type -> count
    responses_by_status: {}, // "200" -> count (including injected faults)
    invalid_grant: 0, // responses whose JSON error is invalid_grant
    faults_served: 0,
    // invalid_grant answers caused by presenting a refresh token that was already consumed
    // (oidc-provider then revokes the whole grant): the figure a racing refresher drives up.
    refresh_token_reuse: 0,
    in_flight: 0, // POST /token requests being handled right now
    max_in_flight: 0, // highest concurrency seen since the last reset
    device_authorizations: 0, // every POST /device/auth (RFC 8628 section 3.1)
  };
}
let stats = freshStats();
let faults = [];
// POST /test/consent {deny: true}: the test user denies consent (the interaction ends in
// error=access_denied, RFC 6749 section 4.1.2.1) until switched back.
let denyConsent = false;
provider.on('grant.error', (ctx, err) => {
  if (err.error_detail === REUSE_DETAIL) stats.refresh_token_reuse += 1;
});

function bump(map, key) {
  map[key] = (map[key] ?? 0) + 1;
}

// Default error bodies for injected status faults (RFC 6749 section 5.2 error codes).
function defaultFaultBody(status) {
  if (status === 500) return { error: 'server_error', error_description: 'injected fault' };
  return { error: 'temporarily_unavailable', error_description: 'injected fault' };
}

// Serves one queued fault instead of letting oidc-provider see the request, so nothing is
// consumed (a refresh token presented here stays valid).  Returns false when the fault passes
// the request through.
async function serveFault(ctx, fault) {
  switch (fault.kind) {
    case 'status': {
      // e.g. {"kind":"status","status":503,"retry_after":"2","body":{...}}
      ctx.status = Number(fault.status ?? 503);
      if (fault.retry_after !== undefined) ctx.set('Retry-After', String(fault.retry_after));
      ctx.body = fault.body ?? defaultFaultBody(ctx.status);
      return true;
    }
    case 'hang': {
      // {"kind":"hang","seconds":N,"close":false}: stall, then 504 (or drop the connection).
      await sleep(Number(fault.seconds ?? 30) * 1000);
      if (fault.close) {
        ctx.state.dropped = true;
        ctx.req.socket.destroy();
        ctx.respond = false;
        return true;
      }
      ctx.status = 504;
      ctx.body = { error: 'temporarily_unavailable', error_description: 'injected hang' };
      return true;
    }
    case 'error_200': {
      // An OAuth error body with HTTP 200, as some providers send.
      ctx.status = 200;
      ctx.body = fault.body ?? { error: 'invalid_code' };
      return true;
    }
    case 'malformed_200': {
      // {"kind":"malformed_200","variant":"html"|"json"}: a 200 that is no token response.
      ctx.status = 200;
      if (fault.body !== undefined) {
        ctx.body = fault.body;
      } else if (fault.variant === 'json') {
        ctx.body = { token_type: 'Bearer', expires_in: 3600 }; // no access_token
      } else {
        ctx.type = 'text/html';
        ctx.body = '<html><body><h1>Service temporarily unavailable</h1></body></html>';
      }
      return true;
    }
    case 'pass':
      // Consumes a queue slot without faulting, to aim a later fault at the Nth request.
      return false;
    case 'lost_response':
      // Handled after oidc-provider ran: the grant IS processed, the client never learns it.
      return false;
    default:
      ctx.status = 500;
      ctx.body = { error: 'server_error', error_description: `unknown fault kind ${fault.kind}` };
      return true;
  }
}

// oidc-provider lets a client registered for client_secret_basic authenticate with
// client_secret_post and vice versa (both are "client secret" methods to it).  Real providers
// differ, and the broker must use the method it is configured with, so by default this server
// only accepts the registered method (config `strictClientAuthMethod`, default true).
const registeredAuthMethod = new Map(
  clients.map((c) => [c.client_id, c.token_endpoint_auth_method ?? 'client_secret_basic']),
);
const strictClientAuthMethod = config.strictClientAuthMethod ?? true;

function basicClientId(ctx) {
  const [scheme, value] = (ctx.headers.authorization ?? '').split(' ');
  if (scheme?.toLowerCase() !== 'basic' || !value) return undefined;
  const decoded = Buffer.from(value, 'base64').toString('utf8');
  const i = decoded.indexOf(':');
  if (i === -1) return undefined;
  try {
    // RFC 6749 section 2.3.1: the id is form-urlencoded before Basic encoding.
    return decodeURIComponent(decoded.slice(0, i).replace(/\+/g, '%20'));
  } catch {
    return undefined;
  }
}

function clientAuthMismatch(ctx, params) {
  const fromBasic = basicClientId(ctx);
  const clientId = fromBasic ?? params.get('client_id');
  const registered = registeredAuthMethod.get(clientId);
  if (fromBasic !== undefined && registered === 'client_secret_post') {
    return 'client is registered for client_secret_post but used HTTP Basic authentication';
  }
  if (params.has('client_secret') && registered === 'client_secret_basic') {
    return 'client is registered for client_secret_basic but sent client_secret in the body';
  }
  return null;
}

async function readRawBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

async function readJson(ctx) {
  const raw = await readRawBody(ctx.req);
  return raw ? JSON.parse(raw) : {};
}

// /test/* control endpoints.  Never proxied to oidc-provider.
provider.use(async (ctx, next) => {
  if (!ctx.path.startsWith('/test/')) return next();
  ctx.type = 'json';
  const route = `${ctx.method} ${ctx.path}`;
  switch (route) {
    case 'POST /test/faults': {
      const body = await readJson(ctx);
      faults = Array.isArray(body.faults) ? [...body.faults] : [];
      ctx.body = { queued: faults.length };
      return undefined;
    }
    case 'DELETE /test/faults':
      faults = [];
      ctx.body = { queued: 0 };
      return undefined;
    case 'GET /test/faults':
      ctx.body = { faults };
      return undefined;
    case 'GET /test/stats':
      ctx.body = { ...stats, faults_queued: faults.length, latency_ms: latencyMs };
      return undefined;
    case 'POST /test/stats/reset': {
      const { in_flight: inFlight } = stats;
      stats = freshStats();
      stats.in_flight = inFlight;
      ctx.body = stats;
      return undefined;
    }
    case 'POST /test/service-accounts': {
      // {client_email, public_jwk}: trust one more service account for the JWT bearer grant.
      const body = await readJson(ctx);
      if (!body.client_email || !body.public_jwk) {
        ctx.status = 400;
        ctx.body = { error: 'invalid_request', error_description: 'client_email and public_jwk required' };
        return undefined;
      }
      serviceAccounts.set(body.client_email, body.public_jwk);
      ctx.body = { service_accounts: serviceAccounts.size };
      return undefined;
    }
    case 'POST /test/grants': {
      // {client_id, count, scope}: what the non-interactive code flow below ends in (a Grant for
      // the test account with the OIDC and API scopes, and a rotating refresh token bound to
      // it, as grant_common.js issues it for authorization_code), minus six HTTP round trips
      // per consent.  The tokens go to the ledger like every other issued token.
      const body = await readJson(ctx);
      const client = await provider.Client.find(String(body.client_id ?? ''));
      const count = Number(body.count ?? 1);
      if (!client || !client.grantTypeAllowed('refresh_token')
        || !Number.isInteger(count) || count < 1 || count > 10000) {
        ctx.status = 400;
        ctx.body = { error: 'invalid_request', error_description: 'a refresh_token client and 1..10000 count required' };
        return undefined;
      }
      const scopes = String(body.scope ?? 'openid offline_access api:read').split(/\s+/);
      const oidcScope = scopes.filter((s) => !s.startsWith('api:')).join(' ');
      const apiScope = scopes.filter((s) => s.startsWith('api:')).join(' ');
      const issued = [];
      for (let i = 0; i < count; i += 1) {
        const grant = new provider.Grant({ accountId: TEST_ACCOUNT, clientId: client.clientId });
        grant.addOIDCScope(oidcScope);
        if (apiScope) grant.addResourceScope(API_RESOURCE, apiScope);
        const grantId = await grant.save();
        const token = new provider.RefreshToken({
          accountId: TEST_ACCOUNT,
          authTime: Math.floor(Date.now() / 1000),
          claims: {},
          client,
          expiresWithSession: false,
          grantId,
          gty: 'authorization_code',
          resource: apiScope ? API_RESOURCE : undefined,
          rotations: 0,
          scope: scopes.join(' '),
        });
        issued.push(await token.save());
      }
      appendFileSync(LEDGER, `${issued.join('\n')}\n`);
      ctx.body = { refresh_tokens: issued };
      return undefined;
    }
    case 'POST /test/refresh-tokens': {
      // {refresh_tokens: [...]} -> {tokens: [{found, consumed, expired, grant, active, ...}]}:
      // would the provider accept each token now?  `active` is what the refresh_token grant
      // checks (found, not consumed, not expired, grant not revoked); nothing is consumed.
      const body = await readJson(ctx);
      const values = Array.isArray(body.refresh_tokens) ? body.refresh_tokens : [];
      const tokens = [];
      for (const value of values) {
        const token = typeof value === 'string' && value
          ? await provider.RefreshToken.find(value, { ignoreExpiration: true })
          : undefined;
        if (!token) {
          tokens.push({ found: false, consumed: false, expired: false, grant: false, active: false });
          continue;
        }
        const grant = await provider.Grant.find(token.grantId);
        const consumed = Boolean(token.consumed);
        const expired = Boolean(token.isExpired);
        tokens.push({
          found: true,
          consumed,
          expired,
          grant: Boolean(grant),
          active: !consumed && !expired && Boolean(grant),
          rotations: token.rotations ?? 0,
          gty: token.gty,
          scope: token.scope,
          resource: token.resource ?? null,
        });
      }
      ctx.body = { tokens };
      return undefined;
    }
    case 'POST /test/consent': {
      const body = await readJson(ctx);
      denyConsent = Boolean(body.deny);
      ctx.body = { deny: denyConsent };
      return undefined;
    }
    case 'POST /test/device': {
      const body = await readJson(ctx);
      if (body.interval !== undefined) deviceInterval = body.interval;
      if (body.ttl !== undefined) deviceCodeTtl = Number(body.ttl);
      ctx.body = { interval: deviceInterval, ttl: deviceCodeTtl };
      return undefined;
    }
    case 'POST /test/latency': {
      const body = await readJson(ctx);
      latencyMs = Number(body.ms ?? 0);
      ctx.body = { latency_ms: latencyMs };
      return undefined;
    }
    default:
      ctx.status = 404;
      ctx.body = { error: 'not_found', error_description: route };
      return undefined;
  }
});

// RFC 8628 section 3.2: the device authorization answer with the configured `interval`
// (null: none sent, the RFC's default of 5 s applies).  Counted like token requests.
provider.use(async (ctx, next) => {
  if (!(ctx.method === 'POST' && ctx.path === '/device/auth')) return next();
  stats.device_authorizations += 1;
  await next();
  if (ctx.status === 200 && ctx.body && typeof ctx.body === 'object' && deviceInterval !== null) {
    ctx.body = { ...ctx.body, interval: deviceInterval };
  }
  return undefined;
});

// POST /token wrapper: counts, latency, faults, JWT bearer client injection, ledger.
provider.use(async (ctx, next) => {
  if (!(ctx.method === 'POST' && ctx.path === TOKEN_PATH)) return next();

  stats.token_requests += 1;
  stats.in_flight += 1;
  stats.max_in_flight = Math.max(stats.max_in_flight, stats.in_flight);
  try {
    // Read the form body here (oidc-provider falls back to `req.body` when the stream has
    // already been consumed), so we know the grant type before anything is processed.
    let params = null;
    if (ctx.is('application/x-www-form-urlencoded')) {
      params = new URLSearchParams(await readRawBody(ctx.req));
      ctx.req.body = params.toString();
    }
    bump(stats.token_requests_by_grant_type, params?.get('grant_type') ?? '(none)');

    if (latencyMs > 0) await sleep(latencyMs);

    const fault = faults.shift();
    if (fault) {
      stats.faults_served += 1;
      if (await serveFault(ctx, fault)) return undefined;
    }

    const mismatch = params && strictClientAuthMethod ? clientAuthMismatch(ctx, params) : null;
    if (mismatch) {
      ctx.status = 401;
      ctx.body = { error: 'invalid_client', error_description: mismatch };
      return undefined;
    }

    // RFC 7523 section 3.2.1 makes client authentication optional for the JWT bearer grant,
    // and Google's token endpoint takes none.  oidc-provider always identifies a client before
    // the grant handler runs, so a bare jwt-bearer request runs as a public client
    // (token_endpoint_auth_method "none") that only allows this grant.
    if (
      params?.get('grant_type') === JWT_BEARER
      && !params.has('client_id')
      && !params.has('client_assertion')
      && ctx.headers.authorization === undefined
    ) {
      params.set('client_id', JWT_BEARER_CLIENT_ID);
      ctx.req.body = params.toString();
    }

    await next();

    // Ledger: every token value the endpoint handed out, one per line.
    const body = ctx.body && typeof ctx.body === 'object' ? ctx.body : {};
    const issued = ['access_token', 'refresh_token', 'id_token']
      .map((k) => body[k])
      .filter((v) => typeof v === 'string' && v);
    if (issued.length) appendFileSync(LEDGER, `${issued.join('\n')}\n`);

    if (fault?.kind === 'lost_response') {
      // The provider committed (a refresh token was rotated), but the response is lost.
      if (fault.status) {
        ctx.status = Number(fault.status);
        ctx.body = defaultFaultBody(ctx.status);
      } else {
        ctx.state.dropped = true;
        ctx.req.socket.destroy();
        ctx.respond = false;
      }
    }
    return undefined;
  } finally {
    stats.in_flight -= 1;
    // "dropped": the connection was closed without a response.
    bump(stats.responses_by_status, ctx.state.dropped ? 'dropped' : String(ctx.status));
    if (ctx.body && typeof ctx.body === 'object' && ctx.body.error === 'invalid_grant') {
      stats.invalid_grant += 1;
    }
  }
});

// Non-interactive login and consent (OpenID Connect Core section 3.1.2.3-4): the provider
// redirects /auth to /interaction/:uid; we finish the interaction for the fixed account and
// grant every requested scope, then redirect back to the provider, which continues to the
// client's redirect_uri with a code.
provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([^/]+)$/.exec(ctx.path);
  if (INTERACTIVE || !match || ctx.method !== 'GET') return next();

  const details = await provider.interactionDetails(ctx.req, ctx.res);
  const { prompt, params, session } = details;
  let result;
  if (prompt.name === 'login') {
    result = { login: { accountId: TEST_ACCOUNT } };
  } else if (prompt.name === 'consent' && denyConsent) {
    result = { error: 'access_denied', error_description: 'the test user denied consent' };
  } else if (prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    result = { consent: details.grantId ? {} : { grantId } };
  } else {
    result = { error: 'access_denied', error_description: `unsupported prompt ${prompt.name}` };
  }
  await provider.interactionFinished(ctx.req, ctx.res, result, { mergeWithLastSubmission: true });
  ctx.respond = false;
  return undefined;
});

// ---------------------------------------------------------------------------------------------
// Start
// ---------------------------------------------------------------------------------------------

const server = provider.listen(PORT, '127.0.0.1', () => {
  console.log(`READY ${ISSUER}`);
});

function shutdown() {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
