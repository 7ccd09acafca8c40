-- Claim up to n groups within max_staleness of the learner's version: fresh groups first,
-- oldest first, then (buffer.replay > 1) groups offered for another use, freshest first.
-- ARGV: n, min_n, max_staleness, visibility_ms, token, hold_as, listed, max_deliveries.
-- A group already handed out max_deliveries times without an ack (0 = no limit) is
-- quarantined instead of claimed: a poison group that crashes every learner that takes
-- it cannot come back forever. A non-empty
-- hold_as records the claim in the journal of held claims (field "hold_as|token") in the
-- same step, so a consumer that dies right after sampling leaves nothing unrecorded.
-- Returns {version, id1, min_version1, uses_before1, id2, ...}; no claims when fewer than
-- min_n groups are admissible, so a waiting learner holds nothing. The claimed ids are also
-- written, in order, to the list `listed`: the client's next command in the same round
-- trip, SORT listed BY nosort GET <payload>:*, reads their payloads without copying them
-- through Lua (returning them from here would), and the one after deletes the list.
local n, min_n, max_staleness = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local visibility_ms, token, hold_as, listed = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local max_deliveries = tonumber(ARGV[8])
local now = now_ms()
local version = current_version()
requeue_expired_claims(now)

-- Groups older than the bound can never become fresher: drop them, counted. Fresh ones
-- were never trained on (dropped_stale); replays were, at least once (replays_expired).
local oldest_allowed = version - max_staleness
local stale = redis.call('ZRANGEBYSCORE', K_READY, '-inf', '(' .. oldest_allowed)
if #stale > 0 then
  remove_entries(stale)
  redis.call('HINCRBY', K_COUNTERS, 'dropped_stale', #stale)
  release_admission(#stale)
end
local expired = redis.call('ZRANGEBYSCORE', K_REPLAY, '-inf', '(' .. oldest_allowed)
if #expired > 0 then
  remove_entries(expired)
  redis.call('HINCRBY', K_COUNTERS, 'replays_expired', #expired)
end

-- {id, min_version, id, min_version, ...}: up to `wanted` fresh groups, then replays.
local function candidates(wanted)
  local chosen = redis.call('ZRANGEBYSCORE', K_READY, oldest_allowed, '+inf', 'WITHSCORES', 'LIMIT', 0, wanted)
  local missing = wanted - #chosen / 2
  if missing > 0 then
    -- The freshest replays: their importance weights are the nearest to 1.
    local replays = redis.call('ZREVRANGEBYSCORE', K_REPLAY, '+inf', oldest_allowed, 'WITHSCORES', 'LIMIT', 0, missing)
    for _, value in ipairs(replays) do chosen[#chosen + 1] = value end
  end
  return chosen
end

-- A group at the delivery limit is quarantined and the next one taken.
local chosen
repeat
  chosen = candidates(n)
  local quarantined = 0
  if max_deliveries > 0 and #chosen > 0 then
    local ids = {}
    for i = 1, #chosen / 2 do ids[i] = chosen[2 * i - 1] end
    local delivered = redis.call('HMGET', K_DELIVERIES, unpack(ids))
    for i, id in ipairs(ids) do
      local times = tonumber(delivered[i] or '0')
      if times >= max_deliveries then
        quarantine_entry(id, 'handed out ' .. times .. ' times without being trained (poison?)')
        quarantined = quarantined + 1
      end
    end
  end
until quarantined == 0
local result = {version}
if #chosen / 2 < min_n or #chosen == 0 then return result end
local ids, staleness = {}, {}
for i = 1, #chosen / 2 do
  local id, lag = chosen[2 * i - 1], version - tonumber(chosen[2 * i])
  ids[i] = id
  staleness[lag] = (staleness[lag] or 0) + 1
end
redis.call('DEL', listed)
call_chunked('RPUSH', listed, ids)
-- Should the client never delete it (its connection dropped mid-pipeline).
redis.call('PEXPIRE', listed, visibility_ms)
call_chunked('ZREM', K_READY, ids)
call_chunked('ZREM', K_REPLAY, ids)
-- The token's claim record; a call that claims again (replacing quarantined entries) adds
-- to it, and the batch's deadline restarts.
local held = held_ids(token)
for _, id in ipairs(ids) do held[#held + 1] = id end
redis.call('HSET', K_CLAIMS, token, cmsgpack.pack(held))
redis.call('ZADD', K_CLAIMED, now + visibility_ms, token)
for lag, count in pairs(staleness) do redis.call('HINCRBY', K_SAMPLED, lag, count) end
local uses = {}
for i, id in ipairs(ids) do
  redis.call('HINCRBY', K_DELIVERIES, id, 1)
  redis.call('HINCRBY', K_PENDING, id, 1)
  uses[i] = redis.call('HINCRBY', K_USES, id, 1)
  redis.call('HINCRBY', K_SAMPLED_USES, uses[i], 1)
end
redis.call('HINCRBY', K_COUNTERS, 'sampled', #ids)
if hold_as ~= '' then
  local field = hold_as .. '|' .. token
  local journal = cjson.decode(redis.call('HGET', K_HELD, field) or '[]')
  for _, id in ipairs(ids) do table.insert(journal, id) end
  redis.call('HSET', K_HELD, field, cjson.encode(journal))
end
for i, id in ipairs(ids) do
  result[3 * i - 1], result[3 * i], result[3 * i + 1] = id, chosen[2 * i], uses[i] - 1
end
return result
