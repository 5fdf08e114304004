// Creates RadStream's topics and ACLs in one JVM start (Kafka's own CLI tools would need one
// start per principal and resource). Run with the Java source launcher:
//   java -cp '<kafka lib>/*' deploy/kafka/Bootstrap.java ADMIN_CLIENT_PROPERTIES SPEC_FILE PREFIX
// SPEC_FILE lines (tab separated, '#' comments):
//   topic <name> <partitions> [<config=value>,...]
//   acl <principal> <TOPIC|GROUP|TRANSACTIONAL_ID|CLUSTER> <LITERAL|PREFIXED> <name> <OPERATION>
// Idempotent: existing topics are kept (their configs are updated), existing ACLs are no-ops.
// Reconciling: an ALLOW ACL of a principal named in the spec, on a resource under PREFIX, that
// the spec does not list any more is deleted, so the broker's grants equal the spec exactly.
import java.io.FileInputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.*;
import java.util.concurrent.ExecutionException;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.common.KafkaFuture;
import org.apache.kafka.common.acl.*;
import org.apache.kafka.common.config.ConfigResource;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.resource.*;

public class Bootstrap {
  public static void main(String[] args) throws Exception {
    Properties props = new Properties();
    try (FileInputStream in = new FileInputStream(args[0])) { props.load(in); }
    List<NewTopic> topics = new ArrayList<>();
    List<AclBinding> acls = new ArrayList<>();
    for (String raw : Files.readAllLines(Path.of(args[1]))) {
      String line = raw.strip();
      if (line.isEmpty() || line.startsWith("#")) continue;
      String[] f = line.split("\t");
      if (f[0].equals("topic")) {
        NewTopic t = new NewTopic(f[1], Integer.parseInt(f[2]), (short) 1);
        Map<String, String> cfg = new HashMap<>();
        if (f.length > 3 && !f[3].isEmpty()) {
          for (String kv : f[3].split(",")) { String[] p = kv.split("=", 2); cfg.put(p[0], p[1]); }
        }
        topics.add(t.configs(cfg));
      } else if (f[0].equals("acl")) {
        ResourcePattern pattern = new ResourcePattern(
            ResourceType.valueOf(f[2]), f[4], PatternType.valueOf(f[3]));
        AccessControlEntry entry = new AccessControlEntry(
            f[1], "*", AclOperation.valueOf(f[5]), AclPermissionType.ALLOW);
        acls.add(new AclBinding(pattern, entry));
      } else {
        throw new IllegalArgumentException("unknown spec line: " + line);
      }
    }
    try (Admin admin = Admin.create(props)) {
      for (Map.Entry<String, KafkaFuture<Void>> e : admin.createTopics(topics).values().entrySet()) {
        try {
          e.getValue().get();
        } catch (ExecutionException ex) {
          if (!(ex.getCause() instanceof TopicExistsException)) throw ex;
        }
      }
      Map<ConfigResource, Collection<AlterConfigOp>> updates = new HashMap<>();
      for (NewTopic t : topics) {
        if (t.configs() == null || t.configs().isEmpty()) continue;
        List<AlterConfigOp> ops = new ArrayList<>();
        for (Map.Entry<String, String> c : t.configs().entrySet()) {
          ops.add(new AlterConfigOp(new ConfigEntry(c.getKey(), c.getValue()), AlterConfigOp.OpType.SET));
        }
        updates.put(new ConfigResource(ConfigResource.Type.TOPIC, t.name()), ops);
      }
      if (!updates.isEmpty()) admin.incrementalAlterConfigs(updates).all().get();
      if (!acls.isEmpty()) admin.createAcls(acls).all().get();
      String prefix = args.length > 2 ? args[2] : "";
      Set<String> principals = new HashSet<>();
      for (AclBinding b : acls) principals.add(b.entry().principal());
      Set<AclBinding> wanted = new HashSet<>(acls);
      List<AclBindingFilter> stale = new ArrayList<>();
      for (String principal : principals) {
        AclBindingFilter mine = new AclBindingFilter(ResourcePatternFilter.ANY,
            new AccessControlEntryFilter(principal, null, AclOperation.ANY, AclPermissionType.ANY));
        for (AclBinding b : admin.describeAcls(mine).values().get()) {
          if (!prefix.isEmpty() && !b.pattern().name().startsWith(prefix)) continue;
          if (!wanted.contains(b)) stale.add(b.toFilter());
        }
      }
      if (!stale.isEmpty()) admin.deleteAcls(stale).all().get();
      System.out.println("bootstrap: removed " + stale.size() + " stale acls");
      // Wait until the broker serves what the controller committed: the metadata log is
      // applied asynchronously, and a client racing it would be refused.
      long deadline = System.currentTimeMillis() + 30000;
      List<String> names = new ArrayList<>();
      for (NewTopic t : topics) names.add(t.name());
      while (true) {
        boolean ok = true;
        try {
          admin.describeTopics(names).allTopicNames().get();
        } catch (ExecutionException ex) {
          ok = false;
        }
        if (ok) {
          Set<AclBinding> seen = new HashSet<>(admin.describeAcls(AclBindingFilter.ANY).values().get());
          ok = seen.containsAll(wanted);
        }
        if (ok) break;
        if (System.currentTimeMillis() > deadline) throw new IllegalStateException("topics/ACLs not visible after 30 s");
        Thread.sleep(50);
      }
    }
    System.out.println("bootstrap: " + topics.size() + " topics, " + acls.size() + " acls");
  }
}
