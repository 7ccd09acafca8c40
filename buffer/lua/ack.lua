-- Finish claims after a learner step (or at the checkpoint that commits it): each use is
-- acked once. ARGV: token, replay, n, id1 .. idn, flag1 .. flagn, where flag '1' marks a
-- group worth another use (see offer_replay). A group with uses left goes (or stays) in
-- `replay`; one without is forgotten, with a tombstone, once no other use of it is pending.
-- A claim that expired (and may have been handed to another consumer) is not acked by
-- its late first owner: only the token holding the claim can ack it.
-- Returns {stale_claims, offered_for_replay, acked_id1, acked_id2, ...}.
local token, replay, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local result = {0, 0}
if n == 0 then return result end
local replayable = {}
for i = 1, n do replayable[ARGV[3 + i]] = ARGV[3 + n + i] == '1' end
local mine, others = release_claims(token, {unpack(ARGV, 4, 3 + n)})
local stale = #others
if #mine > 0 then
  call_chunked('HDEL', K_DELIVERIES, mine)  -- trained: its failed deliveries start again
  local finished, tombstones, offered = {}, {}, 0
  local stamp = tostring(now_ms())  -- converted once, not once per tombstone
  for _, id in ipairs(mine) do
    local pending = redis.call('HINCRBY', K_PENDING, id, -1)
    if pending <= 0 then redis.call('HDEL', K_PENDING, id) end
    local offer = offer_replay(id, replay, replayable[id])
    if offer == 1 then
      offered = offered + 1
    elseif offer == 0 and pending <= 0 then
      finished[#finished + 1] = id
      tombstones[#tombstones + 1] = stamp
      tombstones[#tombstones + 1] = id
    end
    result[#result + 1] = id
  end
  remove_entries(finished)
  if #tombstones > 0 then call_chunked('ZADD', K_ACKED, tombstones) end
  redis.call('HINCRBY', K_COUNTERS, 'acked', #mine)
  if offered > 0 then redis.call('HINCRBY', K_COUNTERS, 'reused', offered) end
  result[2] = offered
end
if stale > 0 then redis.call('HINCRBY', K_COUNTERS, 'stale_acks', stale) end
result[1] = stale
return result
