-- Offer the groups of a trained batch for their next use now, before the checkpoint that
-- will ack this one (a learner that holds its batches until then). The claims stay: the
-- ack still counts the use, and a crash still gives it back.
-- ARGV: token, replay, n, id1 .. idn, flag1 .. flagn (as for ack). Returns how many were
-- offered.
local token, replay, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if n == 0 then return 0 end
local flags = {}
for i = 1, n do flags[ARGV[3 + i]] = ARGV[3 + n + i] == '1' end
local offered = 0
for _, id in ipairs(sort_claims(token, {unpack(ARGV, 4, 3 + n)})) do
  if offer_replay(id, replay, flags[id]) == 1 then offered = offered + 1 end
end
if offered > 0 then redis.call('HINCRBY', K_COUNTERS, 'reused', offered) end
return offered
